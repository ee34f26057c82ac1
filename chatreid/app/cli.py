"""The ``chatreid`` command: one CLI for the local stack, the services, the jobs and queries."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from chatreid.config import Settings, reveal

if TYPE_CHECKING:  # the evaluation engine imports numpy/PIL: loaded only by `eval`
    from chatreid.evaluation import EvalConfig
    from chatreid.prefilter import VectorMeta

app = typer.Typer(help="ChatReID: interactive cross-camera person re-identification.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
ingest_app = typer.Typer(help="Camera ingestor: publish crops to Kafka.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
data_app = typer.Typer(help="Instruction datasets for the tuning stages.", no_args_is_help=True)
app.add_typer(data_app, name="data")
embedder_app = typer.Typer(help="Prefilter embedders: import Re-ID backbones.",
                           no_args_is_help=True)
app.add_typer(embedder_app, name="embedder")
console = Console()


def _settings() -> Settings:
    return Settings()


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)


_INSECURE_HELP = ("turn the API's access control off: every caller holds every role, admin "
                  "included (local experiments only; logged loudly)")


@app.command()
def up(
    ray: Annotated[bool, typer.Option(help="also start a local Ray head")] = True,
    insecure: Annotated[bool, typer.Option(help="generate no bootstrap API key (serve with "
                                                "--insecure then)")] = False,
) -> None:
    """Start the local stack (broker, object store, Ray) on loopback; idempotent. Generates the
    object-store keys and the API's bootstrap key where none is configured (shown once)."""
    from chatreid.app.stack import LocalStack

    settings = _settings()
    stack = LocalStack(settings)
    with console.status("starting the local stack"):
        statuses = stack.up(ray=ray, api_key=not insecure)
    _print_status(statuses)
    _print_credentials(stack, insecure)


def _print_credentials(stack, insecure: bool) -> None:
    """The bootstrap key the first time it is generated; afterwards only where it is."""
    from chatreid.app.stack import API_KEY_VAR

    key = stack.generated.get(API_KEY_VAR)
    if key:
        console.print(f"[bold]bootstrap API key[/] (every role; shown this once, kept in "
                      f"{stack.credentials_file}, owner-only):\n  {key}", soft_wrap=True)
    elif insecure:
        _warn_insecure()
    elif reveal(stack.settings.serve.api_key):
        console.print(f"bootstrap API key: {_where(stack, API_KEY_VAR)} (serve.api_key)")
    others = sorted(set(stack.generated) - {API_KEY_VAR})
    if others:  # object-store keys, the Ray head's token: never shown
        console.print(f"generated into {stack.credentials_file}: {', '.join(others)}")


def _where(stack, var: str) -> str:
    import os

    if os.environ.get(var):
        return f"from the environment ({var})"
    from dotenv import dotenv_values

    if stack.credentials_file.exists() and dotenv_values(stack.credentials_file).get(var):
        return f"in {stack.credentials_file}"
    return f"configured ({var}, .env)"


def _warn_insecure() -> None:
    logging.getLogger("chatreid").warning(
        "ACCESS CONTROL IS OFF (--insecure): every caller of the API holds every role, admin "
        "included. Local experiments only.")
    console.print("[bold red]ACCESS CONTROL IS OFF (--insecure):[/] every caller of the API "
                  "holds every role, admin included. Local experiments only.")


def _require_api_key(settings: Settings, insecure: bool) -> None:
    """Serving needs the bootstrap key, unless access control is explicitly off."""
    if insecure:
        settings.access.insecure = True
    if settings.access.insecure:
        _warn_insecure()
        return
    if not reveal(settings.serve.api_key):
        from chatreid.config import credentials_file

        console.print("[red]no bootstrap API key[/] (serve.api_key): run `chatreid up`, which "
                      f"generates one into {credentials_file()} and shows it once, or set "
                      "CHATREID_SERVE__API_KEY (environment or .env); --insecure serves "
                      "without access control (local experiments only)")
        raise typer.Exit(2)


@app.command()
def down() -> None:
    """Stop the local stack's processes (data stays in the data directory)."""
    from chatreid.app.stack import LocalStack

    stopped = LocalStack(_settings()).down()
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command()
def status() -> None:
    """Show the local stack's services, health, endpoints and logs."""
    from chatreid.app.stack import LocalStack

    stack = LocalStack(_settings())
    statuses = stack.status()
    _print_status(statuses)
    exposed = stack.exposed()
    if exposed:  # e.g. a Ray head an older `chatreid up` started on every interface
        console.print("[bold red]listening beyond loopback:[/] " + ", ".join(exposed))
    if exposed or not all(s.healthy for s in statuses if s.name != "ray"):
        raise typer.Exit(1)


def _print_status(statuses) -> None:
    table = Table("service", "running", "healthy", "pid", "endpoint", "log")
    for s in statuses:
        table.add_row(s.name, "yes" if s.running else "no",
                      "[green]yes[/]" if s.healthy else "[red]no[/]",
                      str(s.pid or "-"), s.endpoint, str(s.log or "-"))
    console.print(table)


@app.command()
def init() -> None:
    """Create the Kafka topics and the object-store bucket (one-shot; idempotent)."""
    from chatreid.bus import ensure_topics
    from chatreid.storage import ObjectStore

    settings = _settings()
    ObjectStore(settings.s3).ensure_bucket()
    created = ensure_topics(settings.kafka)
    console.print(f"bucket {settings.s3.bucket!r} ready; topics created: {created or 'none'}")


# -- world -------------------------------------------------------------------------------------
@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="output folder")] = Path("data/synth"),
    seed: Annotated[int, typer.Option(help="world seed (same seed, same bytes)")] = 0,
    size: Annotated[str, typer.Option(help="small | tiny")] = "small",
    sheet: Annotated[Path | None, typer.Option(help="also write a contact sheet PNG")] = None,
) -> None:
    """Generate the synthetic multi-camera world in the benchmarks' layouts."""
    from chatreid.synth import SynthConfig, generate_world
    from chatreid.viz import world_sheet

    if size not in ("small", "tiny"):
        raise typer.BadParameter("size must be small or tiny")
    config = SynthConfig(seed=seed) if size == "small" else SynthConfig.tiny(seed=seed)
    manifest = generate_world(out, config, progress=True)
    table = Table("layout", "counts", "path", title=f"synthetic world (seed {seed})")
    for name, info in manifest.layouts.items():
        counts = ", ".join(f"{k} {v}" for k, v in info.counts.items())
        table.add_row(name, counts, str(manifest.layout_path(name)))
    console.print(table)
    console.print(f"{manifest.n_identities} identities + {manifest.n_distractors} distractors, "
                  f"{manifest.n_rgb_images} RGB + {manifest.n_ir_images} infrared crops")
    if sheet:
        sheet.parent.mkdir(parents=True, exist_ok=True)
        world_sheet(out).save(sheet)
        console.print(f"contact sheet: {sheet}")


# -- ingestor ----------------------------------------------------------------------------------
def _run_ingest(crops, source: str, total: int | None = None) -> None:
    from tqdm import tqdm

    from services.ingestor import Ingestor

    ingestor = Ingestor(_settings(), source=source)
    try:
        for crop in tqdm(crops, total=total, desc=f"ingest[{source}]", unit="crop"):
            result = ingestor.submit(crop)
            if not result.ok:
                console.print(f"[red]rejected[/] {crop.origin}: {result.error}: {result.reason}")
    finally:
        ingestor.close()
    console.print(f"published {ingestor.published}, rejected {ingestor.rejected}")


@ingest_app.command("synth")
def ingest_synth(
    rate: Annotated[float | None, typer.Option(help="crops per second (default: as fast)")] = None,
    limit: Annotated[int | None, typer.Option(help="stop after N crops")] = None,
    seed: Annotated[int, typer.Option(help="world seed")] = 0,
    verbose: bool = False,
) -> None:
    """Play the synthetic site live: cameras emitting crops over time."""
    import time

    from services.ingestor.sources import synth_source

    _logging(verbose)
    # The site's clock runs faster than the wall clock (~6 simulated s per crop): start it a
    # day back, so ~14k crops have capture times in the past (the ingestor refuses the future).
    start = time.time() - 86_400
    _run_ingest(synth_source(seed, limit, rate, start_time=start), "synth", total=limit)


@ingest_app.command("folder")
def ingest_folder(
    path: Annotated[Path, typer.Argument(help="folder of crops (ROOT/<camera>/<file>)")],
    watch: Annotated[bool, typer.Option(help="keep watching for new files")] = False,
    verbose: bool = False,
) -> None:
    """Publish every crop in a folder (and, with --watch, those that arrive later)."""
    from services.ingestor import Ingestor
    from services.ingestor.sources import FolderSource

    _logging(verbose)
    source = FolderSource(path)
    ingestor = Ingestor(_settings(), source="folder")
    try:
        for p, result in source.publish(ingestor, watch=watch):
            if not result.ok:
                console.print(f"[red]rejected[/] {p}: {result.error}: {result.reason}")
    finally:
        ingestor.close()
    console.print(f"published {ingestor.published}, rejected {ingestor.rejected}")


@ingest_app.command("http")
def ingest_http(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="port")] = None,
) -> None:
    """Serve the HTTP upload endpoint (POST /v1/crops; callers send 'Authorization: Bearer
    <key>' of a key with the 'ingest' role: `chatreid keys issue --role ingest`)."""
    import uvicorn

    from services.ingestor.http import ROLE, create_app

    settings = _settings()
    console.print(f"POST /v1/crops needs 'Authorization: Bearer <key>' with the {ROLE!r} role "
                  f"(chatreid keys issue --name camera-gateway --role {ROLE}); /healthz is open")
    uvicorn.run(create_app(settings), host=host or settings.ingestor.http_host,
                port=port or settings.ingestor.http_port)


# -- embedder ----------------------------------------------------------------------------------
@app.command()
def embed(
    until_idle: Annotated[float | None, typer.Option(
        "--until-idle", help="exit after this many idle seconds (default: run forever)")] = None,
    snapshots: Annotated[bool, typer.Option(
        help="follow the index and snapshot it to object storage (one replica per deployment)"
    )] = True,
    reindex: Annotated[bool | None, typer.Option(
        "--reindex/--no-reindex",
        help="rebuild the index when a new embedder rolls out (default: the snapshot replica)",
    )] = None,
    verbose: bool = False,
) -> None:
    """Run the embedding service: crops topic -> embedder -> prefilter store.

    A new embedder checkpoint on the checkpoints topic is verified, loaded and rolled out
    without a restart: new crops go to both spaces while the index is rebuilt in the background.
    """
    from services.embedder import serve

    _logging(verbose)
    stats = serve(_settings(), until_idle_s=until_idle, snapshots=snapshots, reindex=reindex)
    console.print(f"indexed {stats.indexed}, skipped {stats.skipped}, "
                  f"dead letters {stats.dead_letters}, batches {stats.batches}")


@embedder_app.command("import")
def embedder_import(
    model: Annotated[Path, typer.Argument(help="an ONNX Re-ID model (one image input, one "
                                          "(batch, dim) output)")],
    card: Annotated[str | None, typer.Option(
        help="its model card: a JSON file, or the convention 'torchreid' (NCHW, RGB, ImageNet "
             "mean/std) or 'openvino' (NHWC, BGR, 0-255); default: <model>.card.json or "
             "card.json beside it, else torchreid (sizes read from the graph)")] = None,
    name: Annotated[str | None, typer.Option(help="short name in the version")] = None,
    dry_run: Annotated[bool, typer.Option(help="verify only; push nothing")] = False,
) -> None:
    """Verify an ONNX Re-ID model on probe crops and push it as a versioned embedder
    checkpoint; the running embedding service re-indexes and switches to it (zero downtime),
    after the rollout gate's check."""
    import tempfile

    from chatreid.embedder import WeightsError
    from chatreid.embedder.importer import import_onnx, prepare_onnx

    try:
        if dry_run:
            with tempfile.TemporaryDirectory() as tmp:
                emb, figures = prepare_onnx(model, Path(tmp) / "ckpt", card, name)
            console.print(f"{emb.version}: {emb.card.layout} {emb.card.channel_order} "
                          f"{emb.card.scale}, {emb.dim}-d; probe ok ({figures})")
            return
        settings = _settings()
        with console.status(f"verifying, scoring and pushing {model}"):
            event = import_onnx(settings, model, card, name, score=_gate_scorer(settings))
    except WeightsError as exc:
        console.print(f"[red]refused:[/] {exc}")
        raise typer.Exit(2) from None
    console.print(f"pushed embedder {event.version} ({event.prefix}); the embedding service "
                  "rolls it out")


def _gate_scorer(settings: Settings):
    """The rollout gate's figures for the manifest (None when the gate is off); a validation
    set that cannot be read leaves them out - the gate will name it when it judges."""
    if not settings.gate.enabled:
        return None

    def score(embedder) -> dict[str, float]:
        from chatreid.evaluation.gate import GateError, validation_metrics

        try:
            return validation_metrics(settings, embedder)
        except GateError as exc:
            console.print(f"[yellow]no gate figures in the manifest:[/] {exc}")
            return {}
    return score


# -- queries -----------------------------------------------------------------------------------
@app.command()
def search(
    image: Annotated[Path | None, typer.Argument(help="query image (or use --crop-id)")] = None,
    crop_id: Annotated[str | None, typer.Option(help="query by an indexed crop")] = None,
    k: Annotated[int, typer.Option(help="results to return")] = 20,
    tau: Annotated[float | None, typer.Option(help="cosine threshold")] = None,
    camera: Annotated[list[str] | None, typer.Option(help="only these cameras")] = None,
    modality: Annotated[str | None, typer.Option(help="rgb | infrared")] = None,
    sheet: Annotated[Path | None, typer.Option(help="write a contact sheet PNG")] = None,
) -> None:
    """Prefilter-only search read straight from the index (no VLM; `chatreid query` asks the
    deployed retrieval app, which reranks with the VLM)."""
    from PIL import Image

    from chatreid.prefilter import SearchFilter
    from chatreid.prefilter.search import PrefilterSearch
    from chatreid.viz import results_sheet, results_table

    if (image is None) == (crop_id is None):
        raise typer.BadParameter("give an image path or --crop-id")
    engine = PrefilterSearch(_settings())
    with console.status("loading the index (snapshot + log)"):
        size = engine.refresh()
    try:
        if image is not None:  # exactly one of image and crop_id (checked above)
            query = Image.open(image)
        else:
            assert crop_id is not None
            query = engine.crop_image(crop_id)
    except (OSError, KeyError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    filters = SearchFilter(cameras=frozenset(camera) if camera else None, modality=modality)
    results = engine.search(query, k=k, tau=tau, filters=filters,
                            exclude={crop_id} if crop_id else None)
    console.print(results_table(results, size, "prefilter results (embedder only, no VLM rerank)"))
    if sheet:
        results_sheet(engine.crop_image, query, results, sheet)
        console.print(f"contact sheet: {sheet}")


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(
        help="'latest' (newest checkpoint, the default), 'offline-default', 'tiny', a dir, or "
             "a checkpoint version (pinned: not replaced by newer checkpoints)")
    ] = None,
    replicas: Annotated[int | None, typer.Option(help="rerank replicas")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port")] = None,
    watch: Annotated[bool, typer.Option(
        help="stay up and roll out new VLM checkpoints as they are pushed")] = True,
    print_config: Annotated[bool, typer.Option(
        help="print the portable Serve config (KubeRay serveConfigV2) for these settings and "
             "exit")] = False,
    insecure: Annotated[bool, typer.Option(help=_INSECURE_HELP)] = False,
) -> None:
    """Deploy the retrieval app on Ray Serve (the local head, started if needed), then follow
    checkpoint events and roll each verified VLM checkpoint out replica by replica."""
    import threading

    from chatreid.app.stack import LocalStack
    from chatreid.cluster import connect
    from chatreid.query.vlm import resolve_spec
    from services.retrieval.app import deploy
    from services.retrieval.vlm_rollout import VLMRollout

    _logging(False)
    settings = _settings()
    if model:
        settings.serve.model = model
    if replicas:
        settings.serve.rerank_replicas = replicas
    if port:
        settings.serve.http_port = port
    if print_config:
        import yaml

        from services.retrieval.app import deploy_config

        typer.echo(yaml.safe_dump(deploy_config(settings, portable=True), sort_keys=False))
        return
    _require_api_key(settings, insecure)
    if settings.ray.address is None:
        with console.status("starting the local stack (broker, object store, Ray head)"):
            LocalStack(settings).up(ray=True)
    connect(settings)
    try:
        spec = resolve_spec(settings)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    with console.status(f"deploying {settings.serve.app_name} with "
                        f"{spec.version if spec else 'no model'}"):
        deploy(settings, spec)
    console.print(f"retrieval API: {settings.serve.base_url}  (OpenAPI: "
                  f"{settings.serve.base_url}/docs)  VLM: {spec.version if spec else 'none'}")
    if not watch or settings.serve.model not in ("latest", ""):
        if watch:
            console.print(f"serve.model is pinned to {settings.serve.model!r}: newer "
                          "checkpoints are not rolled out (use --model latest to follow them)")
        return
    console.print("following VLM checkpoints (Ctrl-C stops watching; the app keeps serving)")
    rollout, stop = VLMRollout(settings, spec), threading.Event()
    try:
        rollout.run(stop, on_event=lambda e: console.print(
            f"rollout {e.status}: {e.version}" + (f" ({e.reason})" if e.reason else "")))
    except KeyboardInterrupt:
        pass
    finally:
        rollout.close()


@app.command()
def query(
    image: Annotated[Path | None, typer.Argument(help="query image file")] = None,
    crop_id: Annotated[str | None, typer.Option(help="query by an indexed crop")] = None,
    kind: Annotated[str, typer.Option(
        help="standard | cloth_changing | visible_infrared | text_to_image | attribute | "
        "multimodal")] = "standard",
    text: Annotated[str | None, typer.Option(help="description or extra clue")] = None,
    attr: Annotated[list[str] | None, typer.Option(help="attribute, e.g. 'blue top'")] = None,
    camera: Annotated[list[str] | None, typer.Option(help="only these cameras")] = None,
    modality: Annotated[str | None, typer.Option(help="rgb | infrared")] = None,
    since: Annotated[str | None, typer.Option(help="from this time (ISO 8601)")] = None,
    until: Annotated[str | None, typer.Option(help="up to this time (ISO 8601)")] = None,
    k: Annotated[int, typer.Option(help="candidates the VLM reranks")] = 20,
    top: Annotated[int, typer.Option(help="results to show")] = 10,
    tau: Annotated[float | None, typer.Option(help="prefilter cosine threshold")] = None,
    rationale: Annotated[bool, typer.Option(help="ask the model why, for the top results")
                         ] = False,
    url: Annotated[str | None, typer.Option(help="API base URL (default: from settings)")
                   ] = None,
    sheet: Annotated[Path, typer.Option(help="contact sheet PNG")] = Path("out/query.png"),
    as_json: Annotated[bool, typer.Option("--json", help="print the raw answer")] = False,
) -> None:
    """Ask the deployed retrieval app: ranked table + contact sheet."""
    import base64
    import io

    from PIL import Image
    from pydantic import ValidationError

    from chatreid.client import ApiError, RetrievalClient
    from chatreid.viz import answer_sheet, answer_table
    from schemas import QueryRequest

    try:
        request = QueryRequest.model_validate(dict(  # the flags' strings, validated
            kind=kind, crop_id=crop_id, text=text, attributes=attr or [], k=k, top=top,
            tau=tau, rationale=rationale,
            image_b64=base64.b64encode(image.read_bytes()).decode() if image else None,
            filters={"cameras": camera, "modality": modality, "time_from": since,
                     "time_to": until}))
    except (ValidationError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    settings = _settings()
    client = RetrievalClient(url or settings.serve.base_url, api_key=reveal(settings.serve.api_key))
    try:
        with console.status("asking the retrieval app"):
            response = client.query(request)
    except ApiError as exc:
        console.print(f"[red]{exc.error}[/]: {exc.detail}")
        raise typer.Exit(1) from None
    if as_json:
        console.print_json(response.model_dump_json())
        return
    console.print(answer_table(response))

    def load(cid: str) -> Image.Image:
        return Image.open(io.BytesIO(client.crop(cid)))

    query_image = (Image.open(image) if image else load(crop_id) if crop_id else None)
    console.print(f"contact sheet: {answer_sheet(load, query_image, response, sheet)}")


@app.command()
def checkpoints(
    model: Annotated[str, typer.Option(help="vlm | embedder")] = "vlm",
    stage: Annotated[str | None, typer.Option(help="only this stage, e.g. stage3")] = None,
) -> None:
    """List the complete checkpoints in object storage, newest first: the versions an
    operator pins (`chatreid serve --model VERSION`, Helm `retrieval.model`) or rolls back to,
    with the rollout gate's figures (from the manifest: `gate/mAP`, synthetic / real parts) and
    each version's last rollout step (`deployments.v1`: refused, completed, forced, with the
    gate's mAP of the version vs what served)."""
    from chatreid.checkpoints import manifests
    from chatreid.evaluation.gate import rollout_steps

    if model not in ("vlm", "embedder"):
        raise typer.BadParameter("--model is vlm or embedder")
    settings = _settings()
    found = sorted((e for e in manifests(settings, model) if stage in (None, e.stage)),
                   key=lambda e: e.created_at, reverse=True)
    try:
        steps = rollout_steps(settings, model) if found else {}
    except Exception as exc:  # the broker is optional for a listing
        console.print(f"[yellow]rollout steps unavailable ({type(exc).__name__}: {exc})[/]")
        steps = None
    table = Table("stage", "parent", "created (UTC)", "loss", "rank-1 (chance)",
                  "gate mAP (synth/real)", "last rollout (mAP vs serving)")
    table.columns.insert(0, Column("version", no_wrap=True))  # what operators copy: never cut
    for e in found:
        m = e.metrics
        rank1 = (f"{m['eval/rank1']:.3f} ({m.get('eval/chance_rank1', float('nan')):.3f})"
                 if "eval/rank1" in m else "-")
        table.add_row(e.version, e.stage, e.parent_version or "-",
                      e.created_at.strftime("%Y-%m-%d %H:%M"),
                      f"{m['loss']:.3f}" if "loss" in m else "-", rank1, _gate_figures(m),
                      "?" if steps is None else _rollout_step(steps.get(e.version)))
    console.print(table)
    if not found:
        console.print(f"no {model} checkpoints" + (f" of {stage}" if stage else ""))


@app.command()
def force(
    version: Annotated[str, typer.Argument(help="the checkpoint version the gate refused")],
    reason: Annotated[str, typer.Option(help="why it must serve anyway (audited)")],
    model: Annotated[str, typer.Option(help="vlm | embedder")] = "vlm",
) -> None:
    """Override the rollout gate for one checkpoint: it is announced again, forced, and the
    running services roll it out with its figures still reported (audited first)."""
    import getpass

    from chatreid.checkpoints import find
    from chatreid.checkpoints import force as force_rollout

    if model not in ("vlm", "embedder"):
        raise typer.BadParameter("--model is vlm or embedder")
    if not reason.strip() or len(reason) > 1000:
        raise typer.BadParameter("--reason is required (1 to 1000 characters): it is audited")
    settings = _settings()
    if find(settings, model, version) is None:
        raise typer.BadParameter(f"no complete {model} checkpoint {version!r} (chatreid "
                                 f"checkpoints --model {model} lists them)")
    _audit_cli(settings, "checkpoint.force", target=f"{model}:{version}", detail=reason)
    try:
        event = force_rollout(settings, model, version, by=f"cli:{getpass.getuser()}",
                              reason=reason)
    except LookupError as exc:
        raise typer.BadParameter(str(exc)) from None
    console.print(f"{model} {event.version} announced again, forced: the services roll it out "
                  "(watch `chatreid checkpoints --model " + model + "`)")


def _rollout_step(step) -> str:
    """A version's last rollout step, with the gate's mAP of it vs what served."""
    if step is None:
        return "-"
    out = step.status + (" (forced)" if step.forced else "")
    if "gate/mAP" in step.candidate and "gate/mAP" in step.serving:
        out += f": {step.candidate['gate/mAP']:.3f} vs {step.serving['gate/mAP']:.3f}"
    return out


def _gate_figures(m: dict[str, float]) -> str:
    """The rollout gate's validation figures a manifest carries (``gate/...``)."""
    if "gate/mAP" not in m:
        return "-"
    parts = [f"{m[k]:.3f}" if k in m else "-" for k in ("gate/synthetic_mAP", "gate/real_mAP")]
    return f"{m['gate/mAP']:.3f} ({'/'.join(parts)})"


@app.command("eval")
def evaluate(
    distmat: Annotated[Path | None, typer.Option(
        help="score a saved matrix (.npz: docs/evaluation.md) instead of a suite")] = None,
    protocol: Annotated[str, typer.Option(help="with --distmat: standard | market1501 | msmt17 "
                                          "| cuhk03 | cuhk03_classic | ltcc_general | ltcc_cc "
                                          "| ltcc_same | prcc | sysu_mm01 | regdb | text")
                        ] = "standard",
    max_rank: Annotated[int, typer.Option(help="length of the CMC curve")] = 50,
    suite: Annotated[str, typer.Option(help="synthetic | benchmarks")] = "synthetic",
    task: Annotated[list[str] | None, typer.Option(help="only these tasks (default: all)")
                    ] = None,
    root: Annotated[Path | None, typer.Option(
        help="datasets root (default: the synthetic world, train.world)")] = None,
    k: Annotated[int, typer.Option(help="candidates the VLM reranks per query")] = 10,
    tau: Annotated[float | None, typer.Option(help="prefilter cosine threshold")] = None,
    max_queries: Annotated[int | None, typer.Option(help="a seeded sample of queries")] = None,
    model: Annotated[list[str] | None, typer.Option(
        help="VLM(s), each [LABEL=]MODEL: 'latest', 'offline-default', 'tiny', a dir or a "
             "checkpoint version; several = the stage-ablation table (Table 4)")
    ] = None,
    embedder: Annotated[str, typer.Option(
        help="'latest', 'imagenet', an embedder checkpoint version, a checkpoint file or "
             "directory, or an .onnx Re-ID model (card: CHATREID_EMBEDDER__CARD)")
    ] = "latest",
    baseline_only: Annotated[bool, typer.Option(help="embedder only, no VLM")] = False,
    ranking: Annotated[str, typer.Option(
        help="confidence (the paper's) | fused: also the fused row (docs/vlm.md)")
    ] = "confidence",
    fused_weight: Annotated[float | None, typer.Option(
        help="the fused mode's w; default: fitted on a validation half of the queries")
    ] = None,
    workers: Annotated[int, typer.Option(help="Ray actors holding a VLM each")] = 2,
    out: Annotated[Path | None, typer.Option(help="report folder (suite) or JSON (--distmat)")
                   ] = None,
) -> None:
    """Evaluate: the baseline embedder and ChatReID on a suite (tables, CMC plots), or score
    any method's saved distance matrix under a benchmark's protocol (--distmat)."""
    if distmat is None:
        from chatreid.evaluation import EvalConfig

        try:
            # image queries' shortlists ordered as served (serve.shortlist_order)
            cfg = EvalConfig.served(_settings().serve, k=k, tau=tau, max_queries=max_queries,
                                    ranking=ranking, fused_weight=fused_weight)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        _eval_suite(suite, task, root, cfg, model, embedder, baseline_only, workers,
                    out or Path("out/eval"))
        return
    _score_distmat(distmat, protocol, max_rank, out)


def _eval_suite(suite: str, tasks: list[str] | None, root: Path | None, cfg: EvalConfig,
                models: list[str] | None,
                embedder: str, baseline_only: bool, workers: int, out: Path) -> None:
    import os
    import time

    from chatreid.embedder import WeightsError
    from chatreid.embedder.load import resolve_embedder
    from chatreid.evaluation import BENCHMARKS, SYNTHETIC
    from chatreid.evaluation.report import write_report
    from chatreid.evaluation.tasks import TASK_ALIASES
    from chatreid.query import ModelSpec
    from chatreid.query.vlm import resolve_spec
    from ray_jobs.evaluate import ClusterBusy, run_evaluation

    settings = _settings()
    registry = {"synthetic": SYNTHETIC, "benchmarks": BENCHMARKS}.get(suite)
    if registry is None:
        raise typer.BadParameter("--suite is 'synthetic' or 'benchmarks'")
    tasks = [TASK_ALIASES.get(t, t) for t in tasks] if tasks else tasks  # older names too
    unknown = set(tasks or ()) - set(registry)
    if unknown:
        raise typer.BadParameter(f"unknown tasks {sorted(unknown)}; {suite}: {sorted(registry)}")
    chosen = [registry[t] for t in (tasks or registry)]
    if root is None:
        if suite != "synthetic":
            raise typer.BadParameter("--root is required for the benchmarks suite")
        from ray_jobs.train import PRESETS, ensure_world

        root = ensure_world(settings, PRESETS["default"], console)
    try:
        emb = resolve_embedder(settings, embedder)
    except (LookupError, WeightsError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--embedder") from None
    specs: list[tuple[str, ModelSpec | None]] = [("baseline", None)]
    if not baseline_only:
        specs = []
        for entry in models or ["latest"]:
            label, _, name = entry.rpartition("=")
            settings.serve.model = name
            try:
                spec = resolve_spec(settings)
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from exc
            if spec is None:
                raise typer.BadParameter("no VLM checkpoint and no fallback model")
            specs.append((label or spec.version, spec))
    results = {}
    for label, spec in specs:
        console.print(f"evaluating {len(chosen)} task(s) on {root} with {label}")
        try:
            results[label] = run_evaluation(settings, chosen, root, cfg, embedder=emb,
                                            spec=spec, out=out, workers=workers)
        except ClusterBusy as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from None
    header = {"suite": suite, "date": time.strftime("%Y-%m-%d"), "embedder": emb.version,
              "root": str(root), "machine": f"{os.cpu_count()} CPUs"}
    report = write_report(results, cfg, out, header)
    console.print(report.read_text())
    console.print(f"report: {report}")


def _score_distmat(distmat: Path, protocol: str, max_rank: int, out: Path | None) -> None:
    import json

    import numpy as np

    from chatreid.metrics import PROTOCOLS, Labels, rank_metrics

    if protocol not in PROTOCOLS:
        raise typer.BadParameter(f"unknown protocol {protocol!r}; one of {sorted(PROTOCOLS)}")
    try:
        data = np.load(distmat)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"{distmat}: not a readable .npz ({exc})") from exc
    keys = set(data.files)
    if len(keys & {"distmat", "similarity"}) != 1:
        raise typer.BadParameter(f"{distmat} needs exactly one of 'distmat' or 'similarity'")
    missing = {"q_pids", "g_pids", "q_camids", "g_camids"} - keys
    if missing:
        raise typer.BadParameter(f"{distmat} lacks {sorted(missing)}")

    def labels(side: str) -> Labels:
        clothes = data[f"{side}_clothes"] if f"{side}_clothes" in keys else None
        return Labels(data[f"{side}_pids"], data[f"{side}_camids"], clothes)

    similarity = "similarity" in keys
    try:
        m = rank_metrics(data["similarity" if similarity else "distmat"], labels("q"),
                         labels("g"), protocol, similarity=similarity, max_rank=max_rank)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    table = Table("protocol", "rank-1", "rank-5", "rank-10", "mAP", "mINP", "queries",
                  "skipped", title=f"{distmat.name}: {PROTOCOLS[protocol].description}")
    summary = m.summary()
    table.add_row(protocol, *(f"{100 * summary[k]:.1f}" for k in
                              ("rank1", "rank5", "rank10", "mAP", "mINP")),
                  str(m.queries), str(m.skipped))
    console.print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"protocol": protocol, **summary,
                                   "cmc": m.cmc.tolist()}, indent=2) + "\n")
        console.print(f"wrote {out}")


@app.command()
def demo(
    crops: Annotated[int, typer.Option(help="crops the synthetic site streams")] = 600,
    seed: Annotated[int, typer.Option(help="world seed")] = 0,
    k: Annotated[int, typer.Option(help="candidates the VLM reranks")] = 20,
    top: Annotated[int, typer.Option(help="results to show")] = 10,
    out: Annotated[Path, typer.Option(help="where the contact sheet goes")] = Path("out/demo"),
    insecure: Annotated[bool, typer.Option(help=_INSECURE_HELP)] = False,
) -> None:
    """The main job, end to end: stack up, stream a synthetic site, index it, deploy the
    retrieval app, answer a cross-camera query reranked by the VLM. Like `chatreid up`, it
    generates the bootstrap API key when none is configured (shown once)."""
    from chatreid.app.demo import run_demo

    _logging(False)
    settings = _settings()
    if insecure or settings.access.insecure:  # the flag, or CHATREID_ACCESS__INSECURE
        settings.access.insecure = True
        _warn_insecure()
    run_demo(settings, crops=crops, seed=seed, k=k, top=top, out=out, console=console,
             on_stack_up=lambda stack: _print_credentials(stack, insecure=False))


@app.command()
def health() -> None:
    """Exit 0 when the configured broker and object store answer (container health check)."""
    from chatreid.bus import broker_reachable
    from chatreid.storage import ObjectStore

    settings = _settings()
    checks = {"kafka": broker_reachable(settings.kafka),
              "s3": ObjectStore(settings.s3).healthy()}
    console.print(" ".join(f"{k}={'ok' if v else 'down'}" for k, v in checks.items()))
    if not all(checks.values()):
        raise typer.Exit(1)


# -- data engine and training ------------------------------------------------------------------
def _world(world: Path | None) -> Path:
    return world or _settings().train.world


@data_app.command("build")
def data_build(
    stage: Annotated[int, typer.Option(help="tuning stage: 1, 2 or 3")],
    samples: Annotated[int, typer.Option(help="number of instruction samples")],
    world: Annotated[Path | None, typer.Option(help="world root (default: train.world)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    shards: Annotated[int, typer.Option(help="shards = parallel Ray Data tasks")] = 4,
    split: Annotated[list[str] | None, typer.Option(help="identity splits (default train,val)")]
    = None,
    use_ray: Annotated[bool, typer.Option("--ray/--no-ray")] = True,
    force: Annotated[bool, typer.Option(help="rebuild even if a verified build exists")] = False,
    real_root: Annotated[Path | None, typer.Option(
        help="stages 2-3: identity-only tasks also draw real people (CUHK03 pair-1 layout)")
    ] = None,
    real_share: Annotated[float, typer.Option(help="share of those tasks drawn from real people")
                          ] = 0.5,
) -> None:
    """Build one stage's instruction dataset into object storage and print its stats report."""
    from chatreid.data import InstructionDatasetSpec, build_dataset, render_report
    from chatreid.data.instructions import TRAIN_SPLITS
    from chatreid.data.instructions.real import RealImages

    real = RealImages(root=real_root, share=real_share) if real_root else None
    try:
        spec = InstructionDatasetSpec.model_validate(dict(  # --stage is validated here
            world_root=_world(world), stage=stage, num_samples=samples, seed=seed,
            num_shards=shards, splits=tuple(split) if split else TRAIN_SPLITS, real=real))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    report = build_dataset(_settings(), spec, use_ray=use_ray, force=force)
    console.print(render_report(report))
    console.print(f"dataset {report.dataset_id} stage {stage}"
                  f"{' (already built)' if report.reused else ''}")


@data_app.command("stats")
def data_stats(dataset_id: str, stage: Annotated[int, typer.Option()]) -> None:
    """The stats report of a built dataset."""
    from chatreid.data import load_report, render_report

    console.print(render_report(load_report(_settings(), dataset_id, stage)))


@data_app.command("upload-world")
def data_upload_world(world: Annotated[Path | None, typer.Option()] = None) -> None:
    """Put a world's images and annotations into object storage (for remote workers)."""
    from chatreid.data.worlds import upload_world

    console.print(f"world {upload_world(_settings(), _world(world))}")


@app.command()
def train(
    stage: Annotated[str, typer.Option(
        help="embedder | 1 | 2 | 3 | all | identity (with --model: the identity head of a "
             "stage-3 checkpoint again, e.g. for a new prefilter embedder)")] = "all",
    preset: Annotated[str, typer.Option(
        help="default (the paper's recipe at CPU scale, < 60 min) | quick (<= 20 min: "
             "embedder, a few decoder steps, the identity head) | micro (CI)")] = "default",
    ablation: Annotated[str | None, typer.Option(help="with --stage all: 3 | 2+3 | 1+2+3")]
    = None,
    base: Annotated[str | None, typer.Option(help="offline-default | tiny | checkpoint")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers")] = None,
    gpu: Annotated[bool, typer.Option(help="GPU workers: DeepSpeed ZeRO + bf16")] = False,
    real_root: Annotated[Path | None, typer.Option(
        help="embedder: also train on real images (CUHK03 pair-1 layout) and score on them")
    ] = None,
    start: Annotated[str | None, typer.Option(
        help="embedder: 'imagenet', a torch checkpoint, or an ONNX model / imported version "
             "(frozen: a head trains on its features)")] = None,
    teacher: Annotated[str | None, typer.Option(
        help="embedder: an ONNX Re-ID model to distil from (torch start)")] = None,
    model: Annotated[str | None, typer.Option(
        help="identity: the stage-3 checkpoint version whose head is trained again")] = None,
    extra_people: Annotated[int | None, typer.Option(
        min=0, help="embedder: also train on this many synthetic people of a world of their "
                    "own (the preset's embedder_extra_people; docs/training.md, More people)")
    ] = None,
    embedder_steps: Annotated[int | None, typer.Option(
        min=1, help="embedder: steps per epoch (per worker) instead of the preset's")] = None,
) -> None:
    """Train: the prefilter embedder and/or the HPT stages, as Ray Train jobs.

    Every result is pushed to object storage with a manifest and announced on the checkpoints
    topic; a single stage 2 or 3 continues the newest checkpoint of the stage before it.
    `--stage identity --model VERSION` trains and fits VERSION's identity head again on its
    own stage-3 data (backbone: train.vision_backbone) and pushes it as a new version whose
    parent is VERSION, the decoder unchanged.
    """
    from chatreid.tuning.presets import PRESETS  # light: a bad flag fails before Ray loads

    if stage not in ("embedder", "1", "2", "3", "all", "identity"):
        raise typer.BadParameter("--stage must be embedder, 1, 2, 3, all or identity")
    if preset not in PRESETS:
        raise typer.BadParameter(f"--preset must be one of {sorted(PRESETS)}")
    if (stage == "identity") != (model is not None):
        raise typer.BadParameter("--model goes with --stage identity, and it needs one")
    if stage == "identity":
        from ray_jobs.hpt import refit_identity

        settings = _settings()
        try:
            outcome = refit_identity(  # its trait reader as the preset trains one
                settings, model, PRESETS[preset].trait_people)  # pyright: ignore[reportArgumentType]
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        console.print(f"identity head of {model} trained again: [bold]{outcome.version}"
                      f"[/bold] ({outcome.wall_s / 60:.1f} min)")
        return
    from ray_jobs.train import train as run

    settings = _settings()
    if base:
        settings.train.base_model = base
    if workers:
        settings.train.num_workers = workers
    settings.train.use_gpu = gpu or settings.train.use_gpu
    if real_root:
        settings.train.real_root = real_root
    if start:
        settings.train.embedder_start = start
    if teacher:
        settings.train.embedder_teacher = teacher
    recipe = PRESETS[preset].model_copy(update={
        k: v for k, v in (("embedder_extra_people", extra_people),
                          ("embedder_steps_per_epoch", embedder_steps)) if v is not None})
    run(settings, stage, recipe=recipe, ablation=ablation, console=console)  # type: ignore[arg-type]


# -- erasure and retention -----------------------------------------------------------------------
@app.command()
def erase(
    crop_ids: Annotated[list[str], typer.Argument(help="crop ids to erase")],
    reason: Annotated[str, typer.Option(help="why, recorded on every erasure event")],
    request_id: Annotated[str | None, typer.Option(
        help="the erasure request this belongs to (default: a new id)")] = None,
) -> None:
    """Erase crops: their vectors from every prefilter index (readers, snapshots, restarts,
    rollouts) and their images from object storage. Ids the index does not hold are listed."""
    import uuid
    from datetime import UTC, datetime

    from chatreid.retention import Eraser, index_parts

    settings = _settings()
    metas: dict[str, VectorMeta | None] = dict.fromkeys(crop_ids)
    with console.status("looking the crops up, one index shard at a time (snapshot + log)"):
        for part in index_parts(settings):  # one shard's part in memory at a time
            metas.update({c: part.get_meta(c) for c, m in metas.items() if m is None})
            if all(metas.values()):
                break
    found = [m for m in metas.values() if m is not None]
    request_id = request_id or uuid.uuid4().hex
    erased, deleted = Eraser(settings).erase(found, reason, request_id)
    _audit_cli(settings, "erasure", target=request_id, result_ids=erased, detail=reason)
    table = Table("crop", "camera", "captured", "object",
                  title=f"erased {len(erased)} crops, deleted {deleted} objects")
    for m in found:
        table.add_row(m.crop_id, m.camera,
                      datetime.fromtimestamp(m.capture_time, UTC).isoformat(timespec="seconds"),
                      m.object_key)
    console.print(table)
    unknown = [c for c, m in metas.items() if m is None]
    if unknown:
        console.print(f"[yellow]not indexed, nothing erased:[/] {', '.join(unknown)}")


@app.command()
def purge(
    days: Annotated[float | None, typer.Option(
        help="purge crops captured more than this many days ago (default: retention.crop_days)",
    )] = None,
    every: Annotated[bool, typer.Option(
        "--every", help="keep running: purge every retention.purge_every_hours")] = False,
) -> None:
    """Retention: erase crops older than the retention period from every index and delete
    their images, with crop objects that old no index holds (dead-lettered, never embedded)."""
    import time

    settings = _settings()
    days = settings.retention.crop_days if days is None else days
    if days is None:
        console.print("retention.crop_days is unset: crops are kept forever, nothing to purge")
        return
    from schemas.console import PURGE_DAYS_MAX, PURGE_DAYS_MIN

    if not PURGE_DAYS_MIN <= days <= PURGE_DAYS_MAX:  # the API's bounds; nan fails too
        raise typer.BadParameter(f"--days must lie between {PURGE_DAYS_MIN:.4f} (1 hour) and "
                                 f"{PURGE_DAYS_MAX:g} (100 years)")
    while True:
        _purge_once(settings, days)
        if not every:
            return
        time.sleep(settings.retention.purge_every_hours * 3600)


def _purge_once(settings: Settings, days: float) -> None:
    from datetime import UTC, datetime, timedelta

    from chatreid.retention import Eraser, index_parts
    from chatreid.sessions import SessionStore
    from chatreid.storage import ObjectStore

    cutoff = datetime.now(UTC) - timedelta(days=days)
    with console.status("purging, one index shard at a time (snapshot + log)"):
        crops, objects, indexed = Eraser(settings).purge_parts(
            cutoff, (part.live_metas() for part in index_parts(settings)))
    sessions = SessionStore(settings, ObjectStore(settings.s3)).purge_expired()
    _audit_cli(settings, "retention.purge", detail=f"cutoff={cutoff.isoformat()} "
               f"crops_erased={crops} objects_deleted={objects} sessions_deleted={sessions}")
    table = Table("captured before", "indexed crops", "crops erased", "objects deleted",
                  "expired sessions deleted", title=f"retention purge ({days:g} days)")
    table.add_row(cutoff.isoformat(timespec="seconds"), str(indexed), str(crops),
                  str(objects), str(sessions))
    console.print(table)


def _audit_cli(settings: Settings, action: str, **fields) -> None:
    """Erasures and purges run from a shell are accountable too (actor: the OS user)."""
    import getpass

    from chatreid.audit import AuditLog
    from chatreid.storage import ObjectStore

    AuditLog(settings, ObjectStore(settings.s3)).record("cli", f"cli:{getpass.getuser()}",
                                                        action, 200, **fields)


# -- access keys and the audit trail (through the API, with an admin key) --------------------------
keys_app = typer.Typer(help="API keys with roles (needs an admin key: CHATREID_SERVE__API_KEY).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _admin_client():
    from chatreid.client import RetrievalClient

    settings = _settings()
    return RetrievalClient(settings.serve.base_url, timeout_s=60,
                           api_key=reveal(settings.serve.api_key))


def _api(method: str, path: str, payload: dict | None = None):
    from chatreid.client import ApiError

    try:
        return _admin_client().call(method, path, payload)
    except ApiError as exc:
        console.print(f"[red]{exc.error}[/]: {exc.detail}")
        raise typer.Exit(1) from None


@keys_app.command("issue")
def keys_issue(
    name: Annotated[str, typer.Option(help="who or what holds the key")],
    role: Annotated[list[str], typer.Option(help="investigator | operator | admin | ingest")],
    rate: Annotated[int | None, typer.Option(help="requests per minute")] = None,
) -> None:
    """Issue a key; its secret is printed once and stored only as a hash."""
    issued = _api("POST", "/v1/admin/keys", {"name": name, "roles": role,
                                             "rate_per_minute": rate})
    console.print(f"key {issued['key_id']} ({', '.join(issued['roles'])}) for {name}")
    console.print(f"secret (shown once): [bold]{issued['secret']}[/]")


@keys_app.command("list")
def keys_list() -> None:
    table = Table(Column("key", no_wrap=True), "name", "roles", "rate/min", "created", "by",
                  "revoked")
    for k in _api("GET", "/v1/admin/keys"):
        table.add_row(k["key_id"], k["name"], ", ".join(k["roles"]),
                      str(k["rate_per_minute"] or "default"), k["created_at"][:19],
                      k["created_by"], (k["revoked_at"] or "")[:19])
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    info = _api("DELETE", f"/v1/admin/keys/{key_id}")
    console.print(f"revoked {key_id} ({info['name']}) at {info['revoked_at']}")


@app.command()
def audit(
    since: Annotated[str | None, typer.Option(help="from (ISO 8601; default 30 days ago)")
                     ] = None,
    until: Annotated[str | None, typer.Option(help="up to (ISO 8601; default now)")] = None,
    actor: Annotated[str | None, typer.Option(help="one key id")] = None,
    action: Annotated[str | None, typer.Option(help="e.g. query, view, erasure")] = None,
    out: Annotated[Path | None, typer.Option(help="write JSON lines here")] = None,
) -> None:
    """Export the audit trail (admin key): a table, or JSON lines with --out."""
    import json
    import urllib.parse

    query = {k: v for k, v in {"since": since, "until": until, "actor": actor,
                               "action": action}.items() if v}
    entries = _api("GET", "/v1/admin/audit?" + urllib.parse.urlencode(query))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(e) + "\n" for e in entries))
        console.print(f"{len(entries)} entries -> {out}")
        return
    table = Table("time", "actor", "action", "status", "kind", "target",
                  Column("results", overflow="fold"))
    for e in entries:
        table.add_row(e["at"][:19], e["actor_name"], e["action"], str(e["status"]),
                      e["query_kind"] or "", e["target"] or "", str(len(e["result_ids"])))
    console.print(table)
