"""The investigator console's API on the real app (local stack, tiny VLM): a scripted
investigation over a synthetic site, sessions surviving a replica restart, a role check on
every route, the audit trail, rate and size limits, erasure and retention."""

from __future__ import annotations

import io
import time
import urllib.request
from datetime import UTC, datetime

import pytest
from PIL import Image

from chatreid.client import ApiError, RetrievalClient
from chatreid.embedder.colour import ColourAttributeMatcher
from services.ingestor.sources import synth_source

from .conftest import deploy_site, namespace

pytestmark = pytest.mark.stack

# the synthetic site's clock: midnight three days ago, so both days lie in the past
START = (time.time() // 86_400 - 3) * 86_400
PORT = 8012  # apart from test_serve's app and a developer's (8000)
BOOTSTRAP = "console-bootstrap-key"
PER_DAY = 150  # crops of day 0 and of day 1: people wear another outfit the next day
CROPS = 2 * PER_DAY


@pytest.fixture(scope="module")
def site(stack_base, ray_session, tmp_path_factory):
    """An indexed synthetic site, the app on it (tiny VLM), and one key per role."""
    from ray import serve

    gen = namespace(stack_base)
    settings = next(gen)
    settings.serve.max_turns = 3  # the dialogue reranks the first few; the rest keep order
    settings.serve.rationale_tokens = 8
    settings.access.cache_s = 0.0  # revocation is immediate for the test
    work = tmp_path_factory.mktemp("train")  # where a training run started by the API works
    settings.train.world, settings.train.out_dir = work / "world", work / "out"
    settings.train.num_workers, settings.train.cpus_per_worker = 1, 0.5
    day0 = synth_source(2, PER_DAY, None, start_time=START)
    day1 = synth_source(2, PER_DAY, None, start_time=START, skip_s=86_400)
    root, ingested = deploy_site(settings, [*day0, *day1], port=PORT, api_key=BOOTSTRAP)
    assert len(ingested) == CROPS
    crops = {event.crop_id: (event, crop.labels, crop.data) for event, crop in ingested}
    keys = {role: RetrievalClient(settings.serve.base_url, timeout_s=180, api_key=root.call(
        "POST", "/v1/admin/keys", {"name": f"{role} key", "roles": [role]})["secret"])
        for role in ("investigator", "operator", "admin")}
    yield settings, root, keys, crops
    serve.shutdown()
    next(gen, None)


def _colours(data: bytes) -> dict[str, str]:
    return ColourAttributeMatcher().describe(Image.open(io.BytesIO(data)))


def _describe(data: bytes) -> str:
    """What an eyewitness would say: the garment colours the crop shows."""
    colours = _colours(data)
    return f"a person in a {colours['upper']} top and {colours['lower']} trousers"


def _average_precision(results: list[dict], wanted: set[str]) -> float:
    """Of the wanted crops, how high the results put them (Re-ID's AP over the list)."""
    found = [i for i, r in enumerate(results) if r["crop_id"] in wanted]
    return sum((n + 1) / (i + 1) for n, i in enumerate(found)) / len(wanted)


def _positions(results: list[dict], wanted: set[str]) -> list[int]:
    return [i for i, r in enumerate(results) if r["crop_id"] in wanted]


def test_a_scripted_investigation_narrows_down_on_the_person(site) -> None:
    """An eyewitness describes yesterday's outfit; the investigator confirms a hit, then
    says the person may have changed clothes and describes today's: the person's sightings
    in the new outfit rank higher than the description alone put them, and what was
    rejected never comes back."""
    _settings, _, keys, crops = site
    inv = keys["investigator"]
    days: dict[str, dict[int, list[str]]] = {}
    for crop_id, (event, labels, _) in crops.items():
        if event.modality == "rgb":
            day = int((event.capture_time.timestamp() - START) // 86_400)
            days.setdefault(labels["person_id"], {}).setdefault(day, []).append(crop_id)

    def outfit(ids):
        return {crops[c][1]["clothes_id"] for c in ids}

    def change(d) -> int:  # garment colours that differ between the two days' outfits
        a, b = (_colours(crops[d[day][0]][2]) for day in (0, 1))
        return sum(a[part] != b[part] for part in a)

    candidates = [(p, d) for p, d in days.items() if len(d) == 2 and outfit(d[0]) != outfit(
        d[1]) and min(map(len, d.values())) >= 3]
    person, seen = max(candidates, key=lambda pd: (change(pd[1]), len(pd[1][1])))
    assert change(seen) > 0

    sid = inv.call("POST", "/v1/sessions", {"title": "east gate"})["session_id"]
    first = inv.call("POST", f"/v1/sessions/{sid}/search",
                     {"text": _describe(crops[seen[0][0]][2]), "k": 40, "top": 40})
    assert first["query_kind"] == "text_to_image" and len(first["results"]) == 40
    hit = next((r["crop_id"] for r in first["results"] if r["crop_id"] in seen[0]), None)
    assert hit, "the eyewitness description finds the person somewhere in the top 40"
    wrong = next(r["crop_id"] for r in first["results"]
                 if crops[r["crop_id"]][1]["person_id"] != person)
    view = inv.call("POST", f"/v1/sessions/{sid}/feedback", {"crop_id": hit,
                                                             "verdict": "confirm"})
    assert [s["crop_id"] for s in view["confirmed"]] == [hit]
    view = inv.call("POST", f"/v1/sessions/{sid}/feedback", {"crop_id": wrong,
                                                             "verdict": "reject"})
    assert view["rejected"] == [wrong] and view["anchors"] == [hit]

    today = _describe(crops[seen[1][0]][2]).replace("a person in", "now in")
    refined = inv.call("POST", f"/v1/sessions/{sid}/search",
                       {"text": f"may have changed clothes, {today}", "k": 40, "top": 40})
    assert refined["query_kind"] == "multimodal" and refined["changed_clothes"]
    ids = [r["crop_id"] for r in refined["results"]]
    assert wrong not in ids and hit not in ids
    others = set(seen[0] + seen[1]) - {hit}  # the person's other sightings, both outfits
    before = _average_precision(first["results"], others)
    after = _average_precision(refined["results"], others)
    assert after > before, (before, after)
    # today's outfit, which the eyewitness's description missed, is found
    assert len(_positions(refined["results"], set(seen[1]))) > len(
        _positions(first["results"], set(seen[1]))), "the new outfit's sightings are found"

    for crop_id in ids[:3]:  # confirm what the investigator recognises, reject the rest
        verdict = "confirm" if crops[crop_id][1]["person_id"] == person else "reject"
        inv.call("POST", f"/v1/sessions/{sid}/feedback", {"crop_id": crop_id,
                                                         "verdict": verdict})
    again = inv.call("POST", f"/v1/sessions/{sid}/search", {"k": 40, "top": 40})
    final = inv.call("GET", f"/v1/sessions/{sid}")
    assert not set(final["rejected"]) & {r["crop_id"] for r in again["results"]}
    assert not {s["crop_id"] for s in final["confirmed"]} & {r["crop_id"]
                                                             for r in again["results"]}
    times = [s["capture_time"] for s in final["confirmed"]]
    assert times == sorted(times), "the timeline is in capture order"
    assert [t["action"] for t in final["turns"]][:4] == ["search", "confirm", "reject", "search"]
    assert final["clues"] == [today] and final["changed_clothes"]

    why = inv.call("POST", f"/v1/sessions/{sid}/explain", {"crop_id": ids[0]})
    assert why["reference"] == final["anchors"][0] and why["model_version"] == "base:tiny"
    assert [c["attribute"] for c in why["comparison"]] == ["upper colour", "lower colour"]
    assert all(c["reference"] and c["candidate"] for c in why["comparison"])
    assert inv.call("GET", f"/v1/sessions/{sid}")["turns"][-1]["explanation"] == why


def test_sessions_survive_an_ingress_restart_and_belong_to_their_owner(site) -> None:
    import ray

    _settings, root, keys, crops = site
    inv = keys["investigator"]
    sid = inv.call("POST", "/v1/sessions", {"title": "restart"})["session_id"]
    crop_id = next(iter(crops))
    inv.call("POST", f"/v1/sessions/{sid}/feedback", {"crop_id": crop_id, "verdict": "confirm"})

    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                   if "Ingress" in a["name"] and a["name"].startswith("SERVE_REPLICA"))
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    deadline, view = time.monotonic() + 90, None
    while time.monotonic() < deadline:  # Serve replaces the dead replica
        try:
            view = inv.call("GET", f"/v1/sessions/{sid}")
            break
        except (ApiError, OSError):
            time.sleep(1)
    assert view is not None and [s["crop_id"] for s in view["confirmed"]] == [crop_id]
    assert sid in {s["session_id"] for s in inv.call("GET", "/v1/sessions")}
    with pytest.raises(ApiError) as other:  # the bootstrap key is another owner
        root.call("GET", f"/v1/sessions/{sid}")
    assert (other.value.status, other.value.error) == (404, "session.unknown")


# -- roles -------------------------------------------------------------------------------------
ROUTES = {  # (method, path template) -> the role it needs (None: any valid key)
    ("GET", "/v1/me"): None,
    ("POST", "/v1/query"): "investigator",
    ("GET", "/v1/crops/{crop_id}"): "investigator",
    ("GET", "/v1/cameras"): "investigator",
    ("GET", "/v1/cameras/{camera}/crops"): "investigator",
    ("POST", "/v1/sessions"): "investigator",
    ("GET", "/v1/sessions"): "investigator",
    ("GET", "/v1/sessions/{session_id}"): "investigator",
    ("DELETE", "/v1/sessions/{session_id}"): "investigator",
    ("POST", "/v1/sessions/{session_id}/search"): "investigator",
    ("POST", "/v1/sessions/{session_id}/feedback"): "investigator",
    ("POST", "/v1/sessions/{session_id}/explain"): "investigator",
    ("POST", "/v1/admin/keys"): "admin",
    ("GET", "/v1/admin/keys"): "admin",
    ("DELETE", "/v1/admin/keys/{key_id}"): "admin",
    ("GET", "/v1/admin/audit"): "admin",
    ("POST", "/v1/admin/erasure"): "admin",
    ("POST", "/v1/admin/retention/purge"): "admin",
    ("GET", "/v1/ops/status"): "operator",
    ("POST", "/v1/ops/rollout"): "operator",
    ("POST", "/v1/ops/scale"): "operator",
    ("POST", "/v1/ops/train"): "operator",
    ("GET", "/v1/ops/train/{run_id}"): "operator",
}


def test_every_route_checks_its_role(site) -> None:
    import json

    settings, _root, keys, crops = site
    spec = json.loads(urllib.request.urlopen(f"{settings.serve.base_url}/openapi.json").read())
    served = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops
              if p.startswith("/v1/")}
    assert served == set(ROUTES), "a /v1 route without a declared role"
    anonymous = RetrievalClient(settings.serve.base_url, timeout_s=30)
    fill = {"crop_id": next(iter(crops)), "camera": "cam-1", "session_id": "0" * 16,
            "key_id": "knone", "run_id": "run-none"}
    for (method, template), role in ROUTES.items():
        path = template.format(**fill)
        with pytest.raises(ApiError) as denied:
            anonymous.call(method, path, {} if method == "POST" else None)
        assert denied.value.status == 401, (method, path)
        for holder, client in keys.items():
            if role is None or holder == role:
                continue
            with pytest.raises(ApiError) as denied:
                client.call(method, path, {} if method == "POST" else None)
            assert (denied.value.status, denied.value.error) == (403, "auth.forbidden"), \
                (holder, method, path, denied.value)
    for holder, client in keys.items():  # each key passes its own role's gate
        assert client.call("GET", "/v1/me")["roles"] == [holder]
    assert keys["investigator"].call("GET", "/v1/cameras")
    assert keys["operator"].call("GET", "/v1/ops/status")["app_status"] == "RUNNING"
    assert len(keys["admin"].call("GET", "/v1/admin/keys")) >= 3


def test_keys_limits_and_revocation(site) -> None:
    settings, _root, keys, _crops = site
    admin = keys["admin"]
    issued = admin.call("POST", "/v1/admin/keys",
                        {"name": "burst", "roles": ["investigator"], "rate_per_minute": 3})
    burst = RetrievalClient(settings.serve.base_url, timeout_s=30, api_key=issued["secret"])
    for _ in range(3):
        burst.call("GET", "/v1/me")
    with pytest.raises(ApiError) as limited:
        burst.call("GET", "/v1/me")
    assert (limited.value.status, limited.value.error) == (429, "rate.limited")
    keys["investigator"].call("GET", "/v1/me")  # other keys are not limited by it

    big = {"name": "x" * 100_000, "roles": ["investigator"]}
    with pytest.raises(ApiError) as too_big:
        admin.call("POST", "/v1/admin/keys", big)
    assert (too_big.value.status, too_big.value.error) == (413, "request.too_large")

    other = admin.call("POST", "/v1/admin/keys", {"name": "leaver", "roles": ["investigator"]})
    leaver = RetrievalClient(settings.serve.base_url, timeout_s=30, api_key=other["secret"])
    assert leaver.call("GET", "/v1/me")["name"] == "leaver"
    admin.call("DELETE", f"/v1/admin/keys/{other['key_id']}")
    with pytest.raises(ApiError) as revoked:
        leaver.call("GET", "/v1/me")
    assert (revoked.value.status, revoked.value.error) == (401, "auth.revoked")


def test_operators_see_status_and_roll_out_only_known_models(site) -> None:
    ops = site[2]["operator"]
    status = ops.call("GET", "/v1/ops/status")
    assert status["replicas"]["Rerank"] >= 1 and status["model_version"] == "base:tiny"
    with pytest.raises(ApiError) as unknown:
        ops.call("POST", "/v1/ops/rollout", {"model": "hpt3-doesnotexist"})
    assert (unknown.value.status, unknown.value.error) == (422, "model.unknown")
    rolled = ops.call("POST", "/v1/ops/rollout", {"model": "tiny"})
    assert rolled["model"] == "tiny"
    assert ops.call("POST", "/v1/ops/scale", {"replicas": 1})["replicas"]["Rerank"] >= 1
    with pytest.raises(ApiError) as preset:
        ops.call("POST", "/v1/ops/train", {"target": "embedder", "preset": "huge"})
    assert preset.value.status == 422


# -- audit, erasure, retention ------------------------------------------------------------------
def test_every_query_and_view_is_audited_and_the_log_cannot_be_edited(site) -> None:
    settings, _root, keys, crops = site
    inv, admin = keys["investigator"], keys["admin"]
    crop_id = next(iter(crops))
    since = datetime.now(UTC).isoformat()
    answer = inv.call("POST", "/v1/query", {"crop_id": crop_id, "k": 4, "top": 4})
    inv.crop(answer["results"][0]["crop_id"])
    with pytest.raises(ApiError):
        inv.call("GET", "/v1/admin/audit")  # denied, and that is recorded too

    entries = admin.call("GET", f"/v1/admin/audit?since={since.replace('+', '%2B')}")
    me = inv.call("GET", "/v1/me")["key_id"]
    mine = [e for e in entries if e["actor"] == me]
    assert [e["action"] for e in mine] == ["query", "view", "denied"]
    query = mine[0]
    assert query["query_kind"] == "standard" and query["target"] == crop_id
    assert query["result_ids"] == [r["crop_id"] for r in answer["results"]]
    assert mine[1]["result_ids"] == [answer["results"][0]["crop_id"]]

    for method in ("PUT", "PATCH", "DELETE", "POST"):
        request = urllib.request.Request(f"{settings.serve.base_url}/v1/admin/audit",
                                          method=method, data=b"{}", headers={
                                              "authorization": f"Bearer {BOOTSTRAP}",
                                              "content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request)
        assert refused.value.code == 405
    again = admin.call("GET", f"/v1/admin/audit?since={since.replace('+', '%2B')}")
    assert again[: len(entries)] == entries, "earlier entries are unchanged"
    lines = urllib.request.urlopen(urllib.request.Request(
        f"{settings.serve.base_url}/v1/admin/audit?format=jsonl",
        headers={"authorization": f"Bearer {BOOTSTRAP}"})).read().decode().splitlines()
    assert len(lines) >= len(again)


def test_no_secret_reaches_the_audit_log_or_the_logs(site) -> None:
    import ray

    settings, _root, keys, _crops = site
    secrets = [BOOTSTRAP] + [c.api_key for c in keys.values()]
    exported = urllib.request.urlopen(urllib.request.Request(
        f"{settings.serve.base_url}/v1/admin/audit?format=jsonl",
        headers={"authorization": f"Bearer {BOOTSTRAP}"})).read().decode()
    assert exported and not any(s in exported for s in secrets)
    logs = ray._private.worker._global_node.get_logs_dir_path()
    from pathlib import Path

    for path in Path(logs).rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            text = path.read_bytes()
            assert not any(s.encode() in text for s in secrets), path


def test_erasure_and_retention_remove_crops_and_vectors(site) -> None:
    _settings, root, keys, crops = site
    inv, admin = keys["investigator"], keys["admin"]
    ordered = sorted(crops, key=lambda c: crops[c][0].capture_time)
    sid = inv.call("POST", "/v1/sessions", {"title": "erase me"})["session_id"]
    person = [c for c in ordered[len(ordered) // 2:]][:2]
    for crop_id in person:
        inv.call("POST", f"/v1/sessions/{sid}/feedback", {"crop_id": crop_id,
                                                         "verdict": "confirm"})
    report = admin.call("POST", "/v1/admin/erasure",
                        {"session_id": sid, "crop_ids": ["no-such-crop"],
                         "reason": "data subject request 42"})
    assert sorted(report["erased"]) == sorted(person) and report["unknown"] == ["no-such-crop"]
    assert report["objects_deleted"] >= len(person)
    for crop_id in person:
        with pytest.raises(ApiError) as gone:
            inv.crop(crop_id)
        assert gone.value.status == 404
    probe = inv.call("POST", "/v1/query", {"image_b64": __import__("base64").b64encode(
        crops[person[0]][2]).decode(), "k": 50, "top": 50})
    assert not set(person) & {r["crop_id"] for r in probe["results"]}
    audit = admin.call("GET", "/v1/admin/audit?action=erasure")
    assert audit[-1]["target"] == sid and sorted(audit[-1]["result_ids"]) == sorted(person)
    assert audit[-1]["detail"] == "data subject request 42"

    # retention: everything captured before the site's median time goes
    middle = crops[ordered[len(ordered) // 2]][0].capture_time
    days = (datetime.now(UTC) - middle).total_seconds() / 86400
    purged = admin.call("POST", f"/v1/admin/retention/purge?days={days}")
    old = [c for c in ordered if crops[c][0].capture_time < middle]
    assert purged["crops_erased"] == len(old)
    health = root.health()
    assert health["gallery"] == CROPS - len(person) - len(old)
    cameras = inv.call("GET", "/v1/cameras")
    assert sum(c["crops"] for c in cameras) == health["gallery"]
    with pytest.raises(ApiError):
        inv.crop(old[0])
    probe = inv.call("POST", "/v1/query", {"image_b64": __import__("base64").b64encode(
        crops[old[0]][2]).decode(), "k": 200, "top": 200})
    assert not set(old) & {r["crop_id"] for r in probe["results"]}


def test_keys_and_the_audit_trail_from_the_cli(site, tmp_path) -> None:
    import json
    import subprocess
    import sys

    from .conftest import env_for

    settings = site[0]
    env = {**env_for(settings), "CHATREID_SERVE__HTTP_PORT": str(PORT),
           "CHATREID_SERVE__API_KEY": BOOTSTRAP, "COLUMNS": "200"}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "chatreid", *args], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    issued = cli("keys", "issue", "--name", "night shift", "--role", "investigator")
    secret = next(w for w in issued.split() if w.startswith("crk_"))
    key_id = secret.split("_")[1]
    night = RetrievalClient(settings.serve.base_url, timeout_s=30, api_key=secret)
    assert night.call("GET", "/v1/me")["roles"] == ["investigator"]
    assert key_id in cli("keys", "list")
    cli("keys", "revoke", key_id)
    with pytest.raises(ApiError):
        night.call("GET", "/v1/me")
    out = tmp_path / "audit.jsonl"
    cli("audit", "--action", "key.revoke", "--out", str(out))
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["target"] for e in entries][-1] == key_id


@pytest.mark.slow
def test_an_operator_starts_a_training_run_on_the_cluster(site) -> None:
    from chatreid.checkpoints import manifests

    settings, _, keys, _ = site
    ops = keys["operator"]
    run = ops.call("POST", "/v1/ops/train", {"target": "embedder", "preset": "micro"})
    assert run["state"] == "running" and run["target"] == "embedder"
    deadline = time.monotonic() + 900
    while run["state"] == "running" and time.monotonic() < deadline:
        time.sleep(5)
        run = ops.call("GET", f"/v1/ops/train/{run['run_id']}")
    assert run["state"] == "succeeded", run["detail"]
    version = run["detail"].split()[-1]
    assert version in {m.version for m in manifests(settings, "embedder")}
