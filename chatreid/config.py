"""Settings for every process, from environment variables (prefix ``CHATREID_``, nested ``__``).

One object, passed down explicitly; nothing reads the environment anywhere else. The defaults
point at the local stack (``chatreid up``) on loopback; docker-compose and Helm override them.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

log = logging.getLogger(__name__)
ENV_PREFIX, NESTED = "CHATREID_", "__"
# CHATREID_* variables that are no setting: docker-compose interpolates them (.env is read by
# both compose and the host CLI); .env.example documents them.
COMPOSE_VARIABLES = frozenset({
    "CHATREID_IMAGE", "CHATREID_IMAGE_CUDA", "CHATREID_EMBEDDER_CPU_REPLICAS",
    "CHATREID_PUBLISH_HOST", "CHATREID_INGESTOR_HOST_PORT", "CHATREID_API_HOST_PORT"})


def reveal(secret: SecretStr | None) -> str | None:
    """A secret setting's value, at the point of use (None or "" when it is not set)."""
    return None if secret is None else secret.get_secret_value()


class Section(BaseModel):
    """A group of settings (``CHATREID_<GROUP>__<NAME>``). Assignments are validated, so a
    secret assigned as a plain ``str`` still becomes a :class:`SecretStr` (never in a repr)."""

    model_config = ConfigDict(validate_assignment=True)


class MissingCredentials(RuntimeError):
    """A secret the process needs is configured nowhere; the message says how to get it."""


def revealed(model: BaseModel) -> dict[str, Any]:
    """``model`` (the settings or one group) as JSON data with its secrets in clear, for a
    process this one starts or builds in-process (a child's environment, a test's deployment).
    Never for logs, saved configs or Ray actors' arguments: :func:`chatreid.cluster.share`."""
    data = model.model_dump(mode="json")
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            data[name] = value.get_secret_value()
        elif isinstance(value, BaseModel):
            data[name] = revealed(value)
    return data


def credentials_file(data_dir: Path | None = None) -> Path:
    """Where ``chatreid up`` keeps the local stack's generated secrets (owner-only):
    ``<stack.data_dir>/credentials.env``. Without ``data_dir`` (before the settings exist, as
    when they are being read) stack.data_dir is taken from the environment or ``.env``
    (default ``.chatreid``), relative to the working directory like ``.env`` itself."""
    if data_dir is None:
        data_dir = Path(os.environ.get("CHATREID_STACK__DATA_DIR")
                        or dotenv_values(".env").get("CHATREID_STACK__DATA_DIR") or ".chatreid")
    return data_dir / "credentials.env"


class KafkaSettings(Section):
    """The Kafka cluster every service talks to (topics under ``topic_prefix``)."""

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        description="host:port[,host:port] of the Kafka brokers; the default "
        "is the local stack's broker (`chatreid up`)")
    client_id: str = Field(default="chatreid", description="Kafka client id of every producer and "
                           "consumer (the admin client appends -admin); shows in broker logs "
                           "and quotas")
    topic_prefix: str = Field(default="chatreid", description="prefix of every topic "
                              "(<prefix>.<topic>); change it to run two deployments on one "
                              "Kafka cluster")
    partitions: int = Field(default=6, ge=1, description="partitions of the topics `chatreid init` "
                            "creates; bounds how many embedders share the work (one consumer "
                            "per partition). Existing topics keep theirs")
    replication_factor: int = Field(default=1, ge=1, description="replication factor of the topics "
                                    "`chatreid init` creates (3 on a production cluster)")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT",
        description="how clients connect: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT "
        "or SASL_SSL (SASL credentials below)")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="SASL mechanism with a SASL_* security_protocol; None: PLAIN")
    sasl_username: str | None = Field(default=None, description="SASL user name (SASL_* only)")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password (SASL_* only)")

    def topic(self, name: str) -> str:
        """Full topic name for a logical topic (see ``schemas.topics``)."""
        return f"{self.topic_prefix}.{name}"

    def client_options(self) -> dict[str, Any]:
        """Connection options every producer, consumer and admin client shares."""
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers,
                                   "security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            options.update(sasl_mechanism=self.sasl_mechanism or "PLAIN",
                           sasl_plain_username=self.sasl_username,
                           sasl_plain_password=reveal(self.sasl_password))
        return options


class S3Settings(Section):
    """The S3-compatible object store: crops, snapshots, checkpoints, keys, audit, sessions."""

    endpoint: str = Field(default="127.0.0.1:9000", description="host:port of the S3-compatible "
                          "object store (no scheme; see secure); the default is the local "
                          "stack's")
    # No defaults: well-known keys would open the store to anyone who reads this file.
    access_key: SecretStr | None = Field(
        default=None,
        description="object-store access key; `chatreid up` generates one for the local "
        "stack into <stack.data_dir>/credentials.env")
    secret_key: SecretStr | None = Field(
        default=None, description="object-store secret key (generated with access_key)")
    secure: bool = Field(default=False, description="talk to the object store over TLS (https)")
    region: str | None = Field(
        default=None, description="the store's region, if it needs one; None: "
        "unset (us-east-1 for Ray Train's storage)")
    bucket: str = Field(default="chatreid", description="the one bucket everything is kept in "
                        "(`chatreid init` creates it)")
    public_endpoint: str | None = Field(
        default=None, description="the object store as API clients reach it ([http(s)://]host"
        ":port; no scheme: see secure): crop images are served by a redirect to a short-lived "
        "presigned URL signed for this endpoint; None: endpoint")

    def credentials(self) -> tuple[str, str]:
        """(access key, secret key), or an error saying how to get them."""
        access_key, secret_key = reveal(self.access_key), reveal(self.secret_key)
        if not access_key or not secret_key:
            raise MissingCredentials(
                "no object-store credentials: set CHATREID_S3__ACCESS_KEY and "
                "CHATREID_S3__SECRET_KEY (environment or .env), or run `chatreid up`, which "
                f"generates them for the local stack into {credentials_file()}")
        return access_key, secret_key


class StackSettings(Section):
    """The local stack started by ``chatreid up``."""

    data_dir: Path = Field(
        default=Path(".chatreid"), description="logs, data, pids and the generated "
        "credentials.env (owner-only)")
    kafka_port: int = Field(default=9092, description="port of the local Kafka-protocol broker "
                            "(127.0.0.1 only); change kafka.bootstrap_servers with it")
    s3_port: int = Field(default=9000, description="port of the local S3 object store (127.0.0.1 "
                         "only); change s3.endpoint with it")
    ray: bool = Field(default=True, description="`chatreid up` also starts a local Ray head (jobs "
                      "then join it instead of starting Ray in-process)")
    ray_num_cpus: int = Field(default=2, description="CPUs the local Ray head offers its jobs and "
                              "Serve replicas")
    ray_port: int = Field(
        default=6379, description="the local Ray head's GCS port (127.0.0.1 only); "
        "keep it outside Ray's worker ports 10002-19999")
    ray_client_port: int = Field(
        default=10001, description="the local Ray head's Ray client server "
        "port (127.0.0.1 only)")


class IngestorSettings(Section):
    max_bytes: int = Field(default=2 * 1024 * 1024, description="largest accepted encoded crop, in "
                           "bytes (uploads and query images)")
    max_pixels: int = Field(default=4096 * 4096, description="largest accepted width x height of a "
                            "crop (decompression-bomb guard)")
    min_side: int = Field(default=16, description="smallest accepted crop side in pixels")
    max_side: int = Field(default=4096, description="largest accepted crop side in pixels")
    formats: tuple[str, ...] = Field(default=("JPEG", "PNG", "WEBP", "BMP"), description="accepted "
                                     "image formats (Pillow names); a JSON list in the "
                                     "environment")
    max_future_skew_s: float = Field(
        default=300.0, ge=0, le=86_400, description="capture times more than this far ahead of the "
        "ingestor's clock are refused (camera clock drift allowance)")
    http_store_wait_s: float = Field(
        default=5.0, ge=0,
        description="POST /v1/crops: how long one upload's object-store write waits "
        "out an outage before answering 503 storage.unavailable (the client retries)")
    http_host: str = Field(default="127.0.0.1", description="interface `chatreid ingest http` "
                           "listens on (0.0.0.0 in a container); --host overrides it")
    http_port: int = Field(default=8070, description="port of `chatreid ingest http`; --port "
                           "overrides it")
    producer_linger_ms: int = Field(
        default=50, ge=0, le=1000, description="how long the ingestor's producer gathers crop "
        "events into one request per partition: at full ingest speed fewer, larger requests "
        "save the broker and the ingestor CPU the embedders need on shared cores "
        "(benchmarks/ingest.py); a flush (each HTTP upload, each source checkpoint) sends at "
        "once")


class EmbedderSettings(Section):
    """The prefilter embedder workers (`chatreid embed`): a Kafka consumer group."""

    group_id: str = Field(default="chatreid-embedder", description="Kafka consumer group of the "
                          "embedder workers; workers of one group share the partitions")
    batch_size: int = Field(
        default=32, ge=1, description="crops per forward pass (and most records "
        "per poll)")
    poll_timeout_ms: int = Field(
        default=500, description="how long one poll waits for new crops, in "
        "milliseconds")
    fetch_workers: int = Field(default=8, ge=1, description="parallel object-store reads")
    forward_workers: int = Field(
        default=2, ge=1, description="batches in their forward pass at once, each on its own "
        "thread (torch_threads intra-op threads each); meanwhile the next batch is fetched and "
        "decoded and the finished ones published and committed in poll order. On a CPU shared "
        "with the ingest servers, two single-thread forwards outrun one two-thread forward (no "
        "thread waits for the other at every layer; benchmarks/ingest.py)")
    weights: Path | None = Field(
        default=None,
        description="embedder weights: a checkpoint file or directory, or an .onnx Re-ID "
        "model (`chatreid embedder import` pushes one as a checkpoint instead); default: the "
        "pip-installed ImageNet MobileNetV2")
    card: str | None = Field(
        default=None,
        description="with an .onnx `weights` file: its model card (a JSON file, or the "
        "convention 'torchreid' or 'openvino'); default: <file>.card.json or card.json beside "
        "it, else torchreid. An ONNX model's card fixes its input size (height/width below "
        "apply to the ImageNet default)")
    device: str = Field(default="cpu", description="torch device, e.g. cuda")
    height: int = Field(default=256, description="input height in pixels of the torch embedder (an "
                        "ONNX model's card fixes its own)")
    width: int = Field(default=128, description="input width in pixels of the torch embedder")
    torch_threads: int = Field(default=0, ge=0, description="intra-op threads per forward "
                               "worker (an ONNX model's session threads); 0 = on a CPU the "
                               "cores shared out among forward_workers, else torch's default")
    session_timeout_ms: int = Field(
        default=10_000, description="Kafka consumer session timeout (ms): "
        "a worker silent this long loses its partitions")
    heartbeat_interval_ms: int = Field(
        default=3_000, description="Kafka consumer heartbeat interval "
        "(ms); keep it under a third of session_timeout_ms")
    max_poll_interval_ms: int = Field(
        default=300_000, description="longest time (ms) between polls "
        "before the group takes the worker's partitions away; "
        "raise it for slow batches (large batch_size on CPU)")
    fetch_backoff_initial_s: float = Field(
        default=0.5, gt=0, description="first wait after the object store failed transiently "
        "(refused, reset, timeout, 5xx, SlowDown); the batch is retried from its uncommitted "
        "offset with the partitions paused, never dead-lettered; also the first wait before "
        "a batch whose indexed events the broker refused is published again")
    fetch_backoff_max_s: float = Field(
        default=10.0, gt=0,
        description="longest single wait of that exponential backoff (it doubles "
        "up to this, and keeps retrying while the store stays down)")


class IndexSettings(Section):
    """The prefilter store's follower/snapshotter."""

    snapshot_every_events: int = Field(default=2000, ge=1, description="the snapshot writer saves "
                                       "the index after this many new indexed events ...")
    snapshot_every_s: float = Field(default=60.0, gt=0, description="... or this many seconds, "
                                    "whichever comes first; a restart replays the log from "
                                    "the latest snapshot")
    snapshot_prefix: str = Field(default="prefilter/snapshots", description="where index snapshots "
                                 "(and rebuild reports) are kept in the bucket")
    exact_max: int | None = Field(
        default=None, description="largest exact (flat) index, in vectors; beyond it the index is "
        "approximate; None: sized from the vector dim"
    )
    kind: Literal["auto", "flat", "hnsw", "ivf", "compressed"] = Field(
        default="auto", description="index above exact_max: auto = HNSW over float vectors on "
        "CPU (IVF-SQ8 with GPUs); compressed = 8-bit codes instead of floats plus an IVF of "
        "4-bit PQ codes searched in parallel partitions, under 1 KB a 512-d vector (choose it "
        "past ~1M crops a shard; see docs/scale.md); flat = always exact")
    target_recall: float = Field(
        default=0.97, gt=0, le=1, description="recall@100 against exact search that the "
        "approximate index's search knob is calibrated to (on synthetic queries near the data)")
    partitions: int | None = Field(
        default=None, ge=1, le=8, description="compressed index only: IVF partitions one query "
        "scans in parallel threads; None: one per faiss thread (core)")
    shards: int = Field(
        default=1, ge=1, le=64, description="prefilter shards: shard i holds the crops of the "
        "indexed log's partitions p with p mod shards = i (events are keyed by camera, so a "
        "camera lives in one shard), snapshots and replays only those, and a query fans out "
        "to every shard and merges their top-k. 1 = one index holding everything. At most "
        "the topic's partitions; a divisor of them keeps shards even (docs/scale.md)")
    shard_timeout_s: float = Field(
        default=10.0, gt=0, description="how long a query waits for a shard's answer; a shard "
        "that does not answer in time (or is down) fails the query with 503 "
        "`prefilter.shard_unavailable`, never a silently shorter list")


class RaySettings(Section):
    """Where Ray jobs run: a cluster address, or the local stack's head, or an in-process one."""

    address: str | None = Field(
        default=None,
        description="ray:// or host:port; None joins the local head if up, else starts one"
    )
    join_local_head: bool = Field(
        default=True, description="join the local stack's head when it is up "
        "(tests turn this off to stay isolated from it)")
    num_cpus: int = Field(
        default=2, ge=1, description="CPUs of an in-process Ray (local runs only)")
    placement_timeout_s: float = Field(
        default=300.0, gt=0,
        description="how long a job (e.g. `chatreid eval`) waits for the cluster to "
        "place its actors before it fails saying what it needs and what is free (an autoscaling "
        "cluster may need minutes to add a node)")
    # short: Ray's unix sockets must fit in 107 bytes
    temp_dir: Path = Field(default=Path("/tmp/chatreid-ray"), description="session directory of an "
                           "in-process Ray (logs, sockets); keep the path short")
    auth_token: SecretStr | None = Field(
        default=None,
        description="Ray token of the local stack's head (`chatreid up` generates it into "
        "credentials.env); a cluster elsewhere takes Ray's own RAY_AUTH_TOKEN")


class TrainSettings(Section):
    """Ray Train jobs (HPT stages, embedder): scale, precision, fault tolerance, storage."""

    base_model: str = Field(
        default="offline-default",
        description="'offline-default', 'tiny', a checkpoint dir or hub id"
    )
    world: Path = Field(
        default=Path("data/synth"), description="synthetic world the data engine reads")
    real_root: Path | None = Field(
        default=None,
        description="real person images in the CUHK03 pair-1 layout (train/, val/): the "
        "embedder trains on train/ besides the synthetic world and is scored on val/ too")
    real_share: float = Field(
        default=0.5, gt=0, le=1,
        description="with real_root: the share of the identity-only stage-2/3 "
        "instruction samples (image-to-image retrieval, standard Re-ID reasoning) drawn from "
        "the real people; attribute and caption tasks stay synthetic")
    embedder_start: str = Field(
        default="imagenet", description="what `train --stage embedder` starts from: 'imagenet', a "
        "torch embedder checkpoint (path or version), or an ONNX model / imported checkpoint "
        "(frozen; a head trains on its features)")
    embedder_teacher: str | None = Field(
        default=None, description="an ONNX Re-ID model (path or version) the torch embedder also "
        "distils from (its pairwise similarities); None: no distillation")
    vision_backbone: str = Field(
        default="prefilter",
        description="the Re-ID backbone of the VLM's identity head (trained after "
        "stage 3, saved in the checkpoint's identity/ folder): 'prefilter' (the embedder that "
        "serves the prefilter, the chain's new one when it trains one), 'none' (no identity "
        "head: the decoder alone), or what `evaluate --embedder` accepts (a version, 'imagenet', "
        "an .onnx Re-ID model or checkpoint directory)")
    identity_epochs: int = Field(
        default=60, ge=1, description="epochs of the identity head over the "
        "stage-3 groups (cached features: well under a second each)")
    fit_world: bool = Field(
        default=True, description="choose and judge the reranker's per-kind settings (dialogue "
        "memory, clue weight, learned metric or plain cosine, abstention) also on a second "
        "synthetic world made from the training world's recipe with another seed - people and "
        "cameras neither the prefilter nor the identity head trained on - besides the head's "
        "held-out people of the training world (whom the prefilter knows); a kind reranks only "
        "where its gain holds in both. Off, or for a world without a recipe: the latter only")
    fit_queries: int = Field(
        default=300, ge=10, description="at most this many queries per image task in that fit "
        "(evenly spaced over the crops; every crop of a fit world's people may query)")
    num_workers: int = Field(
        default=2, ge=1, description="Ray Train workers per job (data-parallel "
        "ranks); `chatreid train --workers` overrides it")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs each worker reserves (CPU "
                                   "training; with use_gpu each worker takes one GPU)")
    use_gpu: bool = Field(default=False, description="one GPU per worker, NCCL; `chatreid train "
                          "--gpu` turns it on")
    deepspeed: bool | None = Field(default=None, description="None: DeepSpeed exactly when use_gpu")
    zero_stage: int = Field(default=2, ge=0, le=3, description="DeepSpeed ZeRO stage (with "
                            "deepspeed)")
    bf16: bool | None = Field(default=None, description="None: bf16 exactly when use_gpu")
    torch_threads: int = Field(
        default=1, ge=0, description="intra-op threads per worker; 0 = default")
    max_failures: int = Field(default=1, ge=0, description="worker failures a job survives")
    storage_prefix: str = Field(
        default="train-runs", description="Ray Train run state in the bucket")
    checkpoint_every: int = Field(
        default=50, ge=1, description="steps between resumable checkpoints")
    out_dir: Path = Field(
        default=Path("out/train"), description="local output of `chatreid train`: "
        "report.json and the world and feature caches")


# -- the rollout gate (chatreid/evaluation/gate.py) -----------------------------------------------
class GateSettings(Section):
    """The quality gate every embedder and VLM checkpoint passes before it serves."""

    enabled: bool = Field(
        default=True, description="score each new checkpoint before it serves and "
        "refuse a worse one; `chatreid force` overrides one (audited)")
    synthetic: bool = Field(default=True, description="validate on held-out synthetic people (the "
                            "world's query/gallery split)")
    synthetic_root: Path | None = Field(
        default=None, description="the synthetic world to validate on; "
        "None: train.world")
    real_root: Path | None = Field(
        default=None,
        description="real validation people in the CUHK03 pair-1 layout (val/, A -> B "
        "and B -> A); None: synthetic only")
    max_people: int | None = Field(
        default=100, ge=1, description="held-out people per part: a seeded choice (the same people "
        "every time for the same data) among those with a query and a gallery image; their "
        "queries and gallery images make the part (None: every held-out person)")
    tolerance: float = Field(default=0.0, ge=0, le=1, description="an embedder is refused when its "
                             "mAP is below the serving one's minus this")
    vlm_queries: int = Field(default=12, ge=1, description="synthetic queries a VLM reranks at the "
                             "gate (each is a multi-turn dialogue: keep it small on CPU)")
    vlm_k: int = Field(default=5, ge=2, description="candidates the VLM reranks per gate query")
# -- end of the rollout gate -----------------------------------------------------------------------


class ServeSettings(Section):
    """The retrieval application on Ray Serve: ingress, prefilter, VLM rerank, rollouts."""

    app_name: str = Field(
        default="chatreid", description="the Serve application's name (and the key "
        "of its secrets on the cluster)")
    route_prefix: str = Field(default="/", description="URL path the API is mounted at")
    http_host: str = Field(
        default="127.0.0.1", description="interface Serve's HTTP proxy listens on "
        "(0.0.0.0 in a cluster)")
    http_port: int = Field(default=8000, description="port of Serve's HTTP proxy; Serve keeps the "
                           "port it first started with on a cluster")
    public_url: str | None = Field(
        default=None, description="base URL clients reach the API at (crop URLs); None: host:port")
    model: str = Field(
        default="latest",
        description="'latest' (newest VLM checkpoint of `stage` in object storage), "
        "or 'offline-default', 'tiny', a checkpoint dir")
    stage: str = Field(
        default="stage3", description="which HPT stage's checkpoints serve and roll out")
    fallback_model: str | None = Field(
        default="offline-default",
        description="served while no checkpoint exists; None: answer 503")
    ingress_replicas: int = Field(
        default=1, ge=1, description="Ingress replicas (HTTP routes, access "
        "control, rate limits, sessions)")
    prefilter_replicas: int = Field(default=1, ge=1, description="Prefilter replicas (each follows "
                                    "and holds the whole index)")
    rerank_replicas: int = Field(default=1, ge=1, description="fixed count when autoscaling is off")
    rerank_autoscaling: bool = Field(default=False, description="let Serve scale the rerank "
                                     "replicas between the two bounds below")
    rerank_min_replicas: int = Field(default=1, ge=0, description="fewest rerank replicas when "
                                     "autoscaling (0: none while idle)")
    rerank_max_replicas: int = Field(default=2, ge=1, description="most rerank replicas when "
                                     "autoscaling")
    rerank_target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="requests in flight "
        "per rerank replica autoscaling aims for")
    rerank_num_cpus: float = Field(
        default=1.0, ge=0, description="CPUs reserved per rerank replica")
    rerank_num_gpus: float = Field(
        default=0.0, ge=0, description="GPUs per rerank replica; > 0 serves "
        "the VLM on CUDA in bf16")
    rerank_max_ongoing_requests: int = Field(default=4, ge=1, description="requests one rerank "
                                             "replica takes at once; more queue")
    light_num_cpus: float = Field(
        default=0.1, ge=0, description="CPUs of ingress/prefilter replicas")
    prefilter_shard_resource: str = Field(
        default="", pattern=r"^(\w+)?$", description="a Ray custom resource each PrefilterShard "
        "replica (index.shards > 1) asks one unit of instead of CPUs: shard replicas run only "
        "on the nodes that offer it, as many as its units there (the Helm chart's `prefilter` "
        "worker group offers one per pod, sized for one shard). Empty: they take light_num_cpus "
        "like the other light replicas")
    group_size: int = Field(default=8, ge=2, le=8, description="candidates per best-choice turn")
    max_turns: int | None = Field(default=None, ge=1, description="None: rank every candidate")
    reuse_prefix: bool = Field(default=True, description="encode the query and each candidate crop "
                               "once per query and reuse them across turns; off: a plain full "
                               "forward per group (the reference path)")
    vision_cache_entries: int = Field(
        default=4096, ge=0, description="gallery crops whose vision-tower output a rerank "
        "replica keeps in memory, per encoder version (least recently used dropped; ~25 KB "
        "each for a 128x64 crop on the offline-default VLM); a crop any query saw skips the "
        "ViT in later queries. 0: no cache (needs reuse_prefix)")
    vision_cache_store: bool = Field(
        default=True, description="also keep vision-tower outputs in object storage "
        "(vision-cache/<encoder digest>/<crop object key>), so other and restarted rerank "
        "replicas reuse them; entries of another encoder are never read")
    ranking: Literal["confidence", "fused"] = Field(
        default="confidence", description="how results are ordered: 'confidence' (the paper's: the "
        "reranked crops by the dialogue's confidence, then the rest in prefilter order) or "
        "'fused' (every shortlisted crop by fused_weight * confidence + (1 - fused_weight) * "
        "softmax(prefilter score / 0.05); chatreid.rerank.ranking)")
    fused_weight: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="the fused ranking's weight on the confidence; set "
        "from the checkpoint's fitted weight when it records one")
    shortlist_order: Literal["cosine", "k_reciprocal"] = Field(
        default="cosine", description="how an image query's shortlist is ordered before the VLM "
        "sees its top K: 'cosine' (the embedder's similarity) or 'k_reciprocal' (the cosine top "
        "k_reciprocal_pool re-ordered among themselves by k-reciprocal encoding, Zhong et al. "
        "2017: a candidate whose own neighbours are the query's neighbours moves up; training-"
        "free, a few ms a query; docs/vlm.md). Text-only queries keep their colour order")
    k_reciprocal_pool: int = Field(
        default=100, ge=2, le=1000, description="k_reciprocal order: how many of the cosine top "
        "crops are re-ordered (the query's neighbourhood)")
    k_reciprocal_k1: int = Field(
        default=10, ge=1, description="k_reciprocal order: size of each item's k-reciprocal "
        "neighbourhood (chosen on cuhk03-pair1 train people: docs/vlm.md)")
    k_reciprocal_lambda: float = Field(
        default=0.3, ge=0.0, le=1.0, description="k_reciprocal order: weight of the cosine "
        "distance beside the Jaccard distance of the neighbourhoods (1: cosine order)")
    torch_threads: int = Field(default=0, ge=0, description="intra-op threads per rerank replica")
    rationale_top: int = Field(
        default=3, ge=0, description="results that get a rationale on request")
    rationale_tokens: int = Field(default=64, ge=8, le=256, description="longest rationale, in "
                                  "generated tokens")
    refresh_every_s: float = Field(default=1.0, gt=0, description="prefilter index follow interval")
    fetch_workers: int = Field(default=8, ge=1, description="parallel crop reads per rerank")
    text_window: int = Field(
        default=1000, ge=1, description="newest crops inside the filters a text "
        "or attribute query's colour matcher ranks")
    rollout_timeout_s: float = Field(
        default=600.0, gt=0, description="how long `chatreid serve` (and "
        "a model rollout) waits for the application to run the "
        "new config before it fails")
    api_key: SecretStr | None = Field(
        default=None, description="the bootstrap key: holds every role and "
        "issues scoped keys (send 'Authorization: Bearer <key>'); "
        "`chatreid up` generates one into the stack's credentials file")

    @property
    def base_url(self) -> str:
        root = self.public_url or f"http://{self.http_host}:{self.http_port}"
        return root.rstrip("/") + self.route_prefix.rstrip("/")


class AccessSettings(Section):
    """Who may call the API: keys with roles (kept hashed in object storage), limits per key."""

    key_prefix: str = Field(default="access/keys", description="where issued keys are stored")
    insecure: bool = Field(default=False, description="turn access control off: every caller is "
                           "'anonymous' with every role (local experiments only; logged loudly). "
                           "Off by default: /v1 routes need a key, the bootstrap key included")
    cache_s: float = Field(
        default=5.0, ge=0, description="how long a replica trusts its key cache: "
        "a revoked key stops working within this time")
    rate_per_minute: int = Field(
        default=600, ge=1, description="default requests per minute per key "
        "(per ingress replica)")
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="largest request body, except "
        "one carrying an image upload (ingestor.max_bytes)")
    allowed_origins: list[str] = Field(
        default_factory=list, description="browser origins (scheme://host[:port]) besides the "
        "API's own (its Host, serve.public_url) allowed to send state-changing requests; a JSON "
        "list in the environment, e.g. '[\"https://console.example\"]'")


class AuditSettings(Section):
    """The audit log of every access-controlled action."""

    prefix: str = Field(default="audit", description="append-only audit entries in object storage")


class ConsoleSettings(Section):
    """Investigation sessions."""

    prefix: str = Field(default="sessions", description="session turn logs in object storage")
    idle_hours: float = Field(
        default=24.0, gt=0, description="a session untouched this long expires")
    max_turns: int = Field(default=500, ge=1, description="turns one session may hold")


class RetentionSettings(Section):
    """How long crops are kept (`chatreid purge`)."""

    crop_days: float | None = Field(
        default=30.0, gt=0,
        description="crops and vectors older than this are purged; None keeps all")
    purge_every_hours: float = Field(default=24.0, gt=0, description="how often the purge job runs "
                                     "(the chart's CronJob, `chatreid purge --every`)")


class Settings(BaseSettings):
    # Sources, first wins: environment, .env, then <stack.data_dir>/credentials.env (the secrets
    # `chatreid up` generated for values configured nowhere else), then the defaults. Unknown
    # CHATREID_* variables are ignored, with a warning naming the closest setting.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED, env_file=".env", extra="ignore"
    )

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        env_file = getattr(dotenv_settings, "env_file", ".env")
        warn_unknown(os.environ, "the environment")
        if env_file is None:  # Settings(_env_file=None)
            return init_settings, env_settings, file_secret_settings
        if isinstance(env_file, str | Path) and Path(env_file).is_file():
            warn_unknown(dotenv_values(env_file), str(env_file))
        generated = DotEnvSettingsSource(settings_cls, env_file=credentials_file())
        return init_settings, env_settings, dotenv_settings, generated, file_secret_settings

    site: str = Field(default="default-site", description="site name written on every event (which "
                      "deployment a crop came from)")
    kafka: KafkaSettings = KafkaSettings()
    s3: S3Settings = S3Settings()
    stack: StackSettings = StackSettings()
    ingestor: IngestorSettings = IngestorSettings()
    embedder: EmbedderSettings = EmbedderSettings()
    index: IndexSettings = IndexSettings()
    ray: RaySettings = RaySettings()
    train: TrainSettings = TrainSettings()
    serve: ServeSettings = ServeSettings()
    gate: GateSettings = GateSettings()
    access: AccessSettings = AccessSettings()
    audit: AuditSettings = AuditSettings()
    console: ConsoleSettings = ConsoleSettings()
    retention: RetentionSettings = RetentionSettings()


# -- what the settings are called outside Python ---------------------------------------------------
def env_name(*path: str) -> str:
    """The environment variable of a setting: ``env_name("serve", "api_key")`` is
    ``CHATREID_SERVE__API_KEY``."""
    return ENV_PREFIX + NESTED.join(path).upper()


def setting_paths() -> list[tuple[str, ...]]:
    """Every setting, as (group, name) or (name,) for an ungrouped one, in declaration order."""
    paths: list[tuple[str, ...]] = []
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            paths += [(name, sub) for sub in section.model_fields]
        else:
            paths.append((name,))
    return paths


def secret_paths() -> list[tuple[str, str]]:
    """The (group, name) of every secret setting (typed :class:`SecretStr`)."""
    return [(g, n) for g, n in (p for p in setting_paths() if len(p) == 2)
            if _is_secret(_section(g).model_fields[n].annotation)]


def _section(name: str) -> type[BaseModel]:
    section = Settings.model_fields[name].annotation
    assert isinstance(section, type) and issubclass(section, BaseModel), name
    return section


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in getattr(annotation, "__args__", ())


def known_variables() -> set[str]:
    """Every CHATREID_* variable that means something: each setting, each group (a JSON
    object for a whole group) and the compose-only variables."""
    names = {env_name(*p) for p in setting_paths()}
    names |= {env_name(p[0]) for p in setting_paths()}
    return names | COMPOSE_VARIABLES


_warned: set[tuple[str, str]] = set()


def unknown_variables(names: Any) -> dict[str, str | None]:
    """The CHATREID_* names among ``names`` that are no setting -> the closest real one."""
    known = known_variables()
    unknown = {n.upper() for n in names
               if n.upper().startswith(ENV_PREFIX) and n.upper() not in known}
    return {n: next(iter(difflib.get_close_matches(n, known, n=1, cutoff=0.6)), None)
            for n in sorted(unknown)}


def warn_unknown(variables: Any, where: str) -> None:
    """Log (once per process and name) each unknown CHATREID_* variable in ``variables``: it
    would otherwise be ignored silently, e.g. a misspelt key in ``.env``."""
    for name, closest in unknown_variables(variables).items():
        if (where, name) in _warned:
            continue
        _warned.add((where, name))
        hint = f"; did you mean {closest}?" if closest else ""
        log.warning("%s in %s is not a setting and is ignored%s (every setting: "
                    "docs/configuration.md)", name, where, hint)
