"""`padrec serve` through a real uvicorn server on a loopback port: answers equal the Python API's, every class of
bad input gets a 4xx that names the problem, concurrent requests get the sequential answers, micro-batching
groups what queued up, and (when Ray is installed) the same app runs as 2 Ray Serve replicas."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from padrec import PadrecError
from padrec.serving import RecommendService, ServeSettings, create_app
from padrec.serving.batching import Job, ModelWorker

MAX_HISTORY = 64  # above the 55 distinct items the exclusion case needs


@contextmanager
def running(app):
    """Serve `app` with uvicorn in a thread on a free loopback port (socket bound first: no port race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not shut down"


@pytest.fixture(scope="module")
def draft_run(eagle_run):
    return eagle_run


@pytest.fixture(scope="module")
def server(synth_data, draft_run):
    with pytest.MonkeyPatch.context() as mp:
        for k, v in synth_data.env().items():
            mp.setenv(k, v)
        service = RecommendService.from_run(draft_run, ServeSettings(max_history=MAX_HISTORY, max_k=30, threads=1))
        with running(create_app(service)) as url:
            with httpx.Client(base_url=url, timeout=30) as client:
                yield client, service
    assert service._worker is None  # the lifespan stopped the model thread


@pytest.fixture(scope="module")
def histories(server):
    _, service = server
    cases = service.run.dataset.eval_cases("test", max_history=service.run.info.max_history)
    return [[service.items[i].raw_id for i in c.history] for c in cases]


def post(client, **body):
    return client.post("/recommend", json=body)


def test_health_and_info(server):
    client, service = server
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    info = client.get("/info").json()
    assert info["dataset"] == "synth" and info["items"] == 60
    assert info["target"]["layers"] >= 1 and info["target"]["hidden"] >= 1
    assert info["target"]["params"] == sum(p.numel() for p in service.rec.model.parameters())
    assert info["drafts"] == ["eagle"] and info["default_draft"] == "eagle"
    assert info["sid_scheme"]["levels"] == 2 and info["sid_scheme"]["codebook_size"] == 8
    assert info["vocab_size"] == service.run.sids.vocab.size
    assert info["max_history"] == MAX_HISTORY and info["max_k"] == 30


@pytest.mark.parametrize("mode", ["list", "beam"])
def test_answers_equal_the_python_api(server, histories, mode):
    client, service = server
    for hist in histories[:3]:
        r = post(client, history=hist, k=5, mode=mode)
        assert r.status_code == 200, r.text
        body = r.json()
        want = service.rec.recommend(hist, k=5, mode=mode)
        assert [x["item"] for x in body["items"]] == [w["item"] for w in want]
        assert [x["title"] for x in body["items"]] == [w["title"] for w in want]
        assert [x["rank"] for x in body["items"]] == [1, 2, 3, 4, 5]
        if mode == "beam":
            assert [x["score"] for x in body["items"]] == pytest.approx([w["score"] for w in want], abs=1e-4)
        else:
            assert all("score" not in x for x in body["items"])
        assert body["latency_ms"] > 0 and "tau" not in body


def test_speculative_gives_the_autoregressive_list_and_tau(server, histories):
    client, _ = server
    for hist in histories[:3]:
        ar = post(client, history=hist, k=6).json()
        sd = post(client, history=hist, k=6, decoder="sd").json()
        named = post(client, history=hist, k=6, decoder="sd", draft="eagle").json()
        assert sd["items"] == ar["items"] == named["items"]
        assert sd["draft"] == "eagle" and sd["tau"] >= 1.0 and sd["latency_ms"] > 0


def test_strict_speculative_beam_search_gives_plain_beam_search(server, histories):
    """Every test user: the same items, order and scores (float32 rounding: the tree forward scores a prefix with
    other shapes; a choice closer than that falls back to plain beam search, reported per request)."""
    client, _ = server
    fallbacks = 0
    for hist in histories:
        plain = post(client, history=hist, k=5, mode="beam").json()
        sd = post(client, history=hist, k=5, mode="beam", decoder="sd").json()
        assert [x["item"] for x in sd["items"]] == [x["item"] for x in plain["items"]]
        assert [x["score"] for x in sd["items"]] == pytest.approx([x["score"] for x in plain["items"]], abs=1e-4)
        assert sd["lossless"] is True and sd["verify"] == "strict" and sd["draft"] == "eagle" and sd["tau"] >= 1
        assert isinstance(sd["fallback"], bool) and "fallback" not in plain and "lossless" not in plain
        fallbacks += sd["fallback"]
    assert fallbacks < len(histories)


def test_relaxed_speculative_beam_search_is_labelled_and_reproducible(server, histories):
    client, _ = server
    first = post(client, history=histories[0], k=5, mode="beam", decoder="sd", verify="relaxed",
                 draft_beams=8, gamma=2).json()
    assert first["lossless"] is False and first["verify"] == "relaxed" and isinstance(first["seed"], int)
    again = post(client, history=histories[0], k=5, mode="beam", decoder="sd", verify="relaxed", draft_beams=8,
                 gamma=2, seed=first["seed"]).json()
    assert again["items"] == first["items"]


@pytest.mark.parametrize("decoder", ["ar", "sd"])
def test_sampling_is_reproducible_with_its_seed(server, histories, decoder):
    client, _ = server
    hist = histories[0]
    first = post(client, history=hist, k=5, temperature=1.0, decoder=decoder).json()
    assert isinstance(first["seed"], int)
    again = post(client, history=hist, k=5, temperature=1.0, decoder=decoder, seed=first["seed"]).json()
    assert again["items"] == first["items"] and again["seed"] == first["seed"]


def test_exclude_history(server, histories):
    client, _ = server
    hist = max(histories[:20], key=len)
    for mode in ("list", "beam"):
        body = post(client, history=hist, k=8, mode=mode, exclude_history=True).json()
        assert len(body["items"]) == 8 and not {x["item"] for x in body["items"]} & set(hist)


BAD = [
    # (body, status, words the message must contain)
    ({"history": ["I000", "nope", "I999"], "k": 5}, 422, ["unknown item id", "nope", "I999"]),
    ({"history": [], "k": 5}, 422, ["history is empty"]),
    ({"history": ["I000"] * (MAX_HISTORY + 1)}, 422, [f"{MAX_HISTORY + 1} items", f"at most {MAX_HISTORY}"]),
    ({"history": ["I000"], "k": 0}, 422, ["k=0", "1..30"]),
    ({"history": ["I000"], "k": 31}, 422, ["k=31", "1..30"]),
    ({"history": ["I000"], "k": "ten"}, 422, ["k:", "integer"]),
    ({"history": [f"I{i:03d}" for i in range(55)], "k": 10, "exclude_history": True}, 422, ["only 5 items remain"]),
    ({"history": ["I000"], "mode": "greedy"}, 422, ["mode", "'list' or 'beam'"]),
    ({"history": ["I000"], "decoder": "medusa"}, 422, ["decoder", "'ar' or 'sd'"]),
    ({"history": ["I000"], "mode": "beam", "decoder": "sd", "k": 5, "draft_beams": 3}, 422, ["K <= N", "N=3"]),
    ({"history": ["I000"], "mode": "beam", "decoder": "sd", "gamma": 0}, 422, ["gamma", "greater than or equal"]),
    ({"history": ["I000"], "mode": "beam", "verify": "strict"}, 422, ["verify applies", "decoder='sd'"]),
    ({"history": ["I000"], "decoder": "sd", "gamma": 2}, 422, ["gamma applies", "mode='beam'"]),
    ({"history": ["I000"], "mode": "beam", "decoder": "sd", "verify": "loose"}, 422, ["verify", "'strict' or"]),
    ({"history": ["I000"], "mode": "beam", "decoder": "sd", "temperature": 1}, 422, ["deterministic"]),
    ({"history": ["I000"], "mode": "beam", "decoder": "sd", "draft": "hydra"}, 404, ["unknown draft 'hydra'"]),
    ({"history": ["I000"], "decoder": "sd", "draft": "hydra"}, 404, ["unknown draft 'hydra'", "eagle"]),
    ({"history": ["I000"], "draft": "eagle"}, 422, ["only used with decoder='sd'"]),
    ({"history": ["I000"], "mode": "beam", "temperature": 0.5}, 422, ["beam search is deterministic"]),
    ({"history": ["I000"], "temperature": -1}, 422, ["temperature", "greater than or equal to 0"]),
    ({"history": ["I000"], "seed": 3}, 422, ["seed only applies to sampling"]),
    ({"history": ["I000"], "temprature": 1}, 422, ["temprature", "Extra inputs are not permitted"]),
    ({"history": ["I000", 1.5, True]}, 422, ["history[1]", "history[2]", "integer or a string"]),
    ({"history": "I000"}, 422, ["history", "valid list"]),
    ({"k": 3}, 422, ["history", "Field required"]),
    ([1, 2], 422, ["request body", "dictionary"]),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_4xx_naming_the_problem(server, body, status, words):
    client, _ = server
    r = client.post("/recommend", json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    for w in words:
        assert w in detail, (w, detail)


def test_malformed_http_requests(server):
    client, _ = server
    r = client.post("/recommend", content=b'{"history": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    r = client.post("/recommend", content=b'{"history": ["I000"]}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = client.post("/recommend")
    assert r.status_code == 422 and "request body" in r.json()["detail"]
    assert client.get("/recommend").status_code == 405
    assert client.get("/nope").status_code == 404
    assert client.get("/health").status_code == 200  # and the server is still fine


def test_request_bodies_over_the_cap_get_413(server, histories):
    client, service = server
    limit = service.settings.body_limit
    assert limit == 4096 + 104 * MAX_HISTORY
    # the longest history the server accepts, with long ids, fits under the default cap
    longest = {"history": ["I" + "0" * 95 + f"{i % 60:03d}"[-3:] for i in range(MAX_HISTORY)], "k": 5}
    assert len(json.dumps(longest)) < limit
    assert post(client, **longest).status_code == 422  # read and checked (these ids are unknown), not refused
    big = json.dumps({"history": histories[0], "k": 5, "pad": "x" * limit}).encode()
    r = client.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert f"is {len(big)} bytes, over this server's limit of {limit} bytes" in r.json()["detail"]
    assert "--max-body-bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"history": ['
        for _ in range(limit // 8):
            yield b'"I000", '
        yield b'"I000"]}'

    r = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "passed" in r.json()["detail"]
    assert post(client, history=histories[0], k=5).status_code == 200  # and the server is still fine
    with pytest.raises(PadrecError, match="max_body_bytes must be >= 1024"):
        ServeSettings(max_body_bytes=10)


def test_sd_without_a_trained_draft(synth_env, trained_run):
    service = RecommendService.from_run(trained_run, ServeSettings(threads=1))
    with running(create_app(service)) as url:
        r = httpx.post(f"{url}/recommend", json={"history": ["I000"], "decoder": "sd"}, timeout=30)
        assert r.status_code == 404
        assert "needs a trained draft" in r.json()["detail"] and "padrec train-draft" in r.json()["detail"]
        assert httpx.get(f"{url}/info", timeout=30).json()["drafts"] == []


def test_concurrent_requests_get_the_sequential_answers(server, histories):
    client, _ = server
    kinds = [dict(mode="list"), dict(mode="beam"), dict(mode="list", decoder="sd"),
             dict(mode="list", exclude_history=True)]
    bodies = [dict(history=histories[i % len(histories)], k=4 + i % 3, **kinds[i % len(kinds)]) for i in range(32)]
    bodies += [dict(history=histories[i], k=5) for i in range(16)]  # same key: these can share batches

    def answer(body):
        r = client.post("/recommend", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    sequential = [answer(b) for b in bodies]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(answer, bodies))
    for s, c in zip(sequential, concurrent):
        assert [x["item"] for x in c["items"]] == [x["item"] for x in s["items"]]
        if "score" in s["items"][0]:
            assert [x["score"] for x in c["items"]] == pytest.approx([x["score"] for x in s["items"]], abs=1e-4)
    assert all(s["batch_size"] == 1 for s in sequential)


# ------------------------------------------------------------------------------------------------------------
# the model thread's micro-batching, made deterministic with a gate
# ------------------------------------------------------------------------------------------------------------
def test_worker_batches_what_queued_and_isolates_failures():
    gate = threading.Event()
    calls = []

    def single(x):
        if x == "wait":
            gate.wait(10)
        if x == "bad":
            raise ValueError("bad request")
        calls.append([x])
        return x * 2 if isinstance(x, int) else x

    def batch(xs):
        if "bad" in xs:
            raise ValueError("one row spoils the batch")
        calls.append(list(xs))
        return [x * 2 for x in xs]

    worker = ModelWorker(single, batch, max_batch=3)
    try:
        blocker = worker.submit(Job("wait"))
        jobs = [Job(i, key="a") for i in range(4)] + [Job(10, key=None), Job(20, key="b"), Job(5, key="a")]
        futs = [worker.submit(j) for j in jobs]
        gate.set()
        assert blocker.result(10) == ("wait", 1)
        results = [f.result(10) for f in futs]
        # oldest first, each taking the queued jobs of its key along (max_batch 3): a a a | a a | None | b
        assert calls[1:] == [[0, 1, 2], [3, 5], [10], [20]]
        assert results == [(0, 3), (2, 3), (4, 3), (6, 2), (20, 1), (40, 1), (10, 2)]

        gate.clear()
        worker.submit(Job("wait"))
        mixed = [worker.submit(Job(x, key="a")) for x in (1, "bad", 2)]
        gate.set()
        assert mixed[0].result(10) == (2, 1) and mixed[2].result(10) == (4, 1)
        with pytest.raises(ValueError, match="bad request"):
            mixed[1].result(10)
    finally:
        gate.set()
        worker.close()


def test_http_requests_queued_together_share_one_batch(synth_env, draft_run, histories):
    """--max-batch 8: hold the model thread on a sampled request (never batched), queue 6 greedy list requests
    behind it, release: they come back from one batch of 6, with their batch-1 lists."""
    service = RecommendService.from_run(draft_run, ServeSettings(max_batch=8, threads=1))
    bodies = [dict(history=histories[i], k=5) for i in range(6)]
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=30) as client:
        alone = [client.post("/recommend", json=b).json() for b in bodies]
        assert all(a["batch_size"] == 1 for a in alone)
        worker = service._worker
        entered, gate, inner = threading.Event(), threading.Event(), worker._run_single

        def held(p):
            entered.set()
            gate.wait(20)
            return inner(p)

        worker._run_single = held
        try:
            with ThreadPoolExecutor(7) as pool:
                blocker = pool.submit(client.post, "/recommend",
                                      json=dict(history=histories[0], k=5, temperature=1.0, seed=1))
                assert entered.wait(20)
                futures = [pool.submit(client.post, "/recommend", json=b) for b in bodies]
                deadline = time.monotonic() + 20
                while worker.qsize() < len(bodies):
                    assert time.monotonic() < deadline, "the requests did not queue"
                    time.sleep(0.01)
                gate.set()
                batched = [f.result().json() for f in futures]
                assert blocker.result().json()["batch_size"] == 1
        finally:
            gate.set()
            worker._run_single = inner
    assert [b["batch_size"] for b in batched] == [6] * 6
    assert [b["items"] for b in batched] == [a["items"] for a in alone]


def test_cli_serve_flags():
    from padrec.cli import build_parser, main

    a = build_parser().parse_args(["serve", "--run", "r", "--port", "9000", "--max-history", "50", "--ray",
                                   "--replicas", "3"])
    assert (a.host, a.port, a.max_history, a.ray, a.replicas) == ("127.0.0.1", 9000, 50, True, 3)
    assert main(["serve", "--run", "nowhere", "--replicas", "2"]) == 2  # --replicas without --ray


# ------------------------------------------------------------------------------------------------------------
# Ray Serve: 2 replicas of the same app (skipped unless `ray[serve]` is installed)
# ------------------------------------------------------------------------------------------------------------
def test_ray_serve_two_replicas(synth_env, draft_run, histories, server):
    pytest.importorskip("ray.serve")
    import ray
    from ray import serve

    from padrec.serving.ray_app import build_application

    _, service = server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_application(draft_run, ServeSettings(max_history=MAX_HISTORY, threads=1), replicas=2,
                                cpus_per_replica=0.5)
        serve.run(app, name="padrec", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as client:
            with ThreadPoolExecutor(8) as pool:
                pids = set(pool.map(lambda _: client.get("/health").json()["pid"], range(40)))
            assert len(pids) == 2  # both replicas answer
            hist = histories[0]
            r = client.post("/recommend", json={"history": hist, "k": 5, "decoder": "sd"})
            assert r.status_code == 200, r.text
            assert [x["item"] for x in r.json()["items"]] == [x["item"] for x in service.rec.recommend(hist, 5, "list")]
            bad = client.post("/recommend", json={"history": ["nope"]})
            assert bad.status_code == 422 and "unknown item id" in bad.json()["detail"]
    finally:
        serve.shutdown()
        ray.shutdown()
