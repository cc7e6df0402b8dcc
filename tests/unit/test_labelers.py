"""Labelers: the offline majority vote, and the LLM labeler through the real `openai` client
against a small OpenAI-compatible HTTP server on 127.0.0.1 that each test scripts."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from etl.text.labelers import (MIXED, HeadText, LLMError, LLMLabeler, OfflineLabeler, normalise_property)
from etl.text.bank import PROPERTIES

KEY = "sk-test-SECRET-4f9a1c"


# --------------------------------------------------------------------------- a fake endpoint

class FakeEndpoint:
    """Answers POST /v1/chat/completions from a script of (status, content, delay_s, headers).

    The last script entry repeats once the script runs out. Every request is recorded.
    """

    def __init__(self):
        self.script = []
        self.requests = []            # (headers dict, json body)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                i = min(len(endpoint.requests), len(endpoint.script)) - 1
                status, content, delay, headers, trickle, raw = endpoint.script[i]
                time.sleep(delay)
                if raw is not None:
                    payload = None
                elif status == 200:
                    payload = {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": content}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                else:
                    payload = {"error": {"message": content, "type": "error", "code": status}}
                data = raw if raw is not None else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    if trickle:               # one byte at a time: every read is quick, the whole is not
                        for b in data:
                            self.wfile.write(bytes([b]))
                            self.wfile.flush()
                            time.sleep(trickle)
                    else:
                        self.wfile.write(data)
                except OSError:           # the client gave up (timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def answer(self, content, status=200, delay=0.0, headers=None, trickle=None, raw=None):
        self.script.append((status, content, delay, headers or {}, trickle, raw))
        return self


@pytest.fixture
def endpoint():
    ep = FakeEndpoint()
    yield ep
    ep.server.shutdown()
    ep.server.server_close()


@pytest.fixture
def make_llm(endpoint, tmp_path):
    def make(**kw):
        kw.setdefault("timeout_s", 5.0)
        kw.setdefault("backoff_s", 0.01)
        return LLMLabeler("test-model", api_key=KEY, base_url=endpoint.url, cache_dir=tmp_path / "llm", **kw)
    return make


COLOR_HEAD = [HeadText("a vivid red color", "colors", 0.30), HeadText("shades of blue", "colors", 0.20),
              HeadText("an image of a tiger", "animals", 0.10), HeadText("the color green", "colors", 0.05)]


def assert_key_nowhere(tmp_path, *texts):
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert KEY not in f.read_text(errors="replace"), f
    for t in texts:
        assert t is None or KEY not in t


# --------------------------------------------------------------------------- offline

def test_offline_label_is_the_variance_weighted_majority():
    lab = OfflineLabeler()
    label = lab.label(COLOR_HEAD)
    assert label.property == "colors"
    assert label.confidence == pytest.approx(0.55 / 0.65)
    assert label.labeler == "offline" and label.prompt_hash and label.error is None
    assert json.loads(label.raw)["shares"]["animals"] == pytest.approx(0.10 / 0.65)


def test_offline_label_is_mixed_below_the_threshold_and_untagged_texts_dilute():
    head = [HeadText("a", "colors", 0.3), HeadText("b", "animals", 0.25), HeadText("c", None, 0.2),
            HeadText("d", "not-a-property", 0.25)]
    label = OfflineLabeler(threshold=0.35, majority=0.0).label(head)
    assert label.property == MIXED
    assert label.confidence == pytest.approx(0.3)
    assert OfflineLabeler(threshold=0.25, min_votes=1, majority=0.0).label(head).property == "colors"
    assert OfflineLabeler(threshold=0.25, majority=0.0).label(head).property == MIXED   # one text is no agreement
    two = head + [HeadText("e", "colors", 0.1)]
    assert OfflineLabeler(threshold=0.25, majority=0.0).label(two).property == "colors"
    # the majority among voting texts: colors carry 0.4 of the 0.65 that votes (0.62)
    assert OfflineLabeler(threshold=0.25, majority=0.6).label(two).property == "colors"
    assert OfflineLabeler(threshold=0.25, majority=0.65).label(two).property == MIXED
    assert json.loads(OfflineLabeler().label(two).raw)["majority"] == pytest.approx(0.4 / 0.65, abs=1e-4)
    with pytest.raises(ValueError, match="majority"):
        OfflineLabeler(majority=1.5)
    # a tie goes to the property of the better-ranked text
    tie = [HeadText("a", "animals", 0.2), HeadText("b", "colors", 0.2)]
    assert OfflineLabeler(threshold=0.5, min_votes=1, majority=0.0).label(tie).property == "animals"
    assert OfflineLabeler().label([]).error


def test_offline_match_is_by_tag():
    lab = OfflineLabeler()
    assert lab.match(HeadText("a vivid red color", "colors", 0.1), "colors").associated is True
    assert lab.match(HeadText("a vivid red color", "colors", 0.1), "animals").associated is False
    assert lab.match(HeadText("my text", None, 0.1), "colors").associated is False
    assert lab.match(HeadText("x", "colors", 0.1), "colors").judge == "tag"


def test_normalise_property():
    assert normalise_property("Colour", PROPERTIES) == "colors"
    assert normalise_property("ANIMAL", PROPERTIES) == "animals"
    assert normalise_property("art_styles", PROPERTIES) == "art styles"
    assert normalise_property("Time-of-day", PROPERTIES) == "time of day"
    assert normalise_property("geography", PROPERTIES) == "locations"
    assert normalise_property("patterns.", PROPERTIES) == "textures"
    assert normalise_property("Mixed", PROPERTIES) == MIXED
    assert normalise_property("furniture", PROPERTIES) is None
    assert normalise_property("geography", ["colors"]) is None     # synonyms only onto the vocabulary


# --------------------------------------------------------------------------- LLM

def test_llm_good_answer_is_normalised_cached_and_keeps_the_key_out(endpoint, make_llm, tmp_path):
    endpoint.answer('```json\n{"property": "Colour", "confidence": 0.8}\n```')
    llm = make_llm()
    label = llm.label(COLOR_HEAD)
    assert (label.property, label.confidence, label.error) == ("colors", 0.8, None)
    assert label.labeler == "llm:test-model"
    assert label.raw.startswith("```json") and label.prompt_hash == llm.prompt_hash
    headers, body = endpoint.requests[0]
    assert headers["authorization"] == f"Bearer {KEY}"          # the key goes to the endpoint...
    assert body["model"] == "test-model" and body["temperature"] == 0
    assert "a vivid red color" in body["messages"][-1]["content"]
    assert any(m["role"] == "assistant" for m in body["messages"])  # few-shot examples
    assert "time of day" in body["messages"][0]["content"]          # the vocabulary
    # second call: same answer from the cache, no request (also from a fresh labeler)
    assert llm.label(COLOR_HEAD) == label
    assert make_llm().label(COLOR_HEAD) == label
    assert len(endpoint.requests) == 1
    assert len(list((tmp_path / "llm").glob("*.json"))) == 1
    assert_key_nowhere(tmp_path, label.raw)                         # ...and nowhere else


def test_llm_malformed_json_is_a_per_head_error_and_not_cached(endpoint, make_llm, tmp_path):
    endpoint.answer("I think this head is about colours!")
    endpoint.answer('{"property": "colors", "confidence": 0.7')     # truncated JSON
    llm = make_llm()
    first = llm.label(COLOR_HEAD)
    assert first.property is None and "no JSON object" in first.error
    assert first.raw == "I think this head is about colours!"
    second = llm.label(COLOR_HEAD)                                  # asked again: not cached
    assert second.property is None and "unusable LLM answer" in second.error
    assert len(endpoint.requests) == 2
    assert not list((tmp_path / "llm").glob("*.json"))


def test_llm_unknown_property_is_a_clear_per_head_error(endpoint, make_llm):
    endpoint.answer('{"property": "furniture", "confidence": 0.9}')
    label = make_llm().label(COLOR_HEAD)
    assert label.property is None
    assert "'furniture' is not in the vocabulary" in label.error and "colors" in label.error
    assert label.raw == '{"property": "furniture", "confidence": 0.9}'


def test_llm_retries_429_then_succeeds(endpoint, make_llm):
    endpoint.answer("slow down", status=429, headers={"Retry-After": "0.05"})
    endpoint.answer("overloaded", status=503)
    endpoint.answer('{"property": "animals", "confidence": 0.6}')
    t0 = time.monotonic()
    label = make_llm().label(COLOR_HEAD)
    assert label.property == "animals" and label.confidence == 0.6
    assert len(endpoint.requests) == 3
    assert time.monotonic() - t0 >= 0.05                            # honoured Retry-After


def test_llm_timeout_is_retried_then_bounded(endpoint, make_llm, tmp_path):
    endpoint.answer("", delay=1.0)                                  # longer than the client timeout
    endpoint.answer('{"property": "counting", "confidence": 1}')
    label = make_llm(timeout_s=0.2).label(COLOR_HEAD)
    assert label.property == "counting"
    assert len(endpoint.requests) == 2
    # an endpoint that never answers in time: bounded attempts, then a clear error
    slow = FakeEndpoint().answer("", delay=1.0)
    try:
        llm = LLMLabeler("test-model", api_key=KEY, base_url=slow.url, cache_dir=tmp_path / "c2",
                         timeout_s=0.2, max_retries=2, backoff_s=0.01)
        t0 = time.monotonic()
        with pytest.raises(LLMError, match="kept failing after 3 attempts") as err:
            llm.label(COLOR_HEAD)
        assert time.monotonic() - t0 < 3.0
        assert len(slow.requests) == 3
        assert KEY not in str(err.value)
    finally:
        slow.server.shutdown()
        slow.server.server_close()


def test_llm_rejected_key_and_missing_key_stop_with_advice(endpoint, make_llm, tmp_path, monkeypatch):
    endpoint.answer(f"Incorrect API key provided: {KEY}", status=401)
    with pytest.raises(LLMError, match="rejected the API key") as err:
        make_llm().label(COLOR_HEAD)
    assert KEY not in str(err.value) and "***" in str(err.value)
    assert len(endpoint.requests) == 1                               # no retry on 401
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(LLMError, match="OPENAI_API_KEY"):
        LLMLabeler("m", base_url=endpoint.url, cache_dir=tmp_path / "x").label(COLOR_HEAD)


def test_llm_reads_key_and_url_from_the_environment(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", endpoint.url)
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path / "home"))
    endpoint.answer('{"property": "mixed", "confidence": "0.4"}')
    llm = LLMLabeler("env-model")
    assert llm.label(COLOR_HEAD).property == MIXED
    assert llm.cache_dir == tmp_path / "home" / "cache" / "llm"
    assert len(list(llm.cache_dir.glob("*.json"))) == 1
    assert_key_nowhere(tmp_path)


def test_llm_judge_answers_one_or_zero_and_is_cached(endpoint, make_llm, tmp_path):
    endpoint.answer('{"associated": 1}')
    endpoint.answer('{"associated": 0}')
    endpoint.answer('{"associated": "maybe"}')
    llm = make_llm()
    yes = llm.match(HeadText("a vivid red color", None, 0.1), "colors")
    no = llm.match(HeadText("an image of a tiger", None, 0.1), "colors")
    bad = llm.match(HeadText("the letter Q", None, 0.1), "colors")
    assert (yes.associated, no.associated, bad.associated) == (True, False, None)
    assert yes.judge == "llm:test-model" and yes.prompt_hash == llm.judge_prompt_hash
    assert "must be 1 or 0" in bad.error
    assert llm.match(HeadText("a vivid red color", None, 0.1), "colors") == yes
    assert len(endpoint.requests) == 3
    assert "Property: colors" in endpoint.requests[0][1]["messages"][-1]["content"]
    assert_key_nowhere(tmp_path)


def test_prompt_hash_changes_with_the_vocabulary_not_with_the_head(make_llm):
    a, b = make_llm(), make_llm(vocabulary={"colors": "colours", "animals": "animals"})
    assert a.prompt_hash != b.prompt_hash
    assert a.prompt_hash == make_llm().prompt_hash


def test_model_agreement_tells_a_property_head_from_a_lookalike():
    """A head that carries a colour moves with the rest of the model's reading of the colour
    text; a head whose variance lies along the same text direction for another reason (here:
    an unrelated variable) does not."""
    from etl.text.labelers import model_agreement
    rng = np.random.default_rng(5)
    n, d = 600, 16
    red, alt = rng.normal(size=d), rng.normal(size=d)
    q = (red - alt) / np.linalg.norm(red - alt)
    colour = rng.normal(size=n)                              # how red each image is
    other = rng.normal(size=n)                               # something else entirely
    rest = np.outer(colour, q) + 0.3 * rng.normal(size=(n, d))            # the rest of the model reads colour
    carrier = np.outer(colour, q) + 0.3 * rng.normal(size=(n, d))         # a real colour head
    lookalike = np.outer(other, q) + 0.3 * rng.normal(size=(n, d))        # same direction, other cause
    for head, expect in ((carrier, "high"), (lookalike, "low")):
        rho = model_agreement(head, head + rest, red[None], alt[None])
        b, r = head @ (red - alt), rest @ (red - alt)
        assert rho[0] == pytest.approx(np.corrcoef(b, r)[0, 1])
        assert (rho[0] > 0.8) if expect == "high" else (abs(rho[0]) < 0.15)
    # texts that fail the check do not vote
    from etl.text.labelers import HeadText, OfflineLabeler
    from etl.text.labelers import agreement_p_value
    lab = OfflineLabeler(["colors", "shapes"])                       # threshold 0.35, 2 votes
    strong, p_strong = 0.6, agreement_p_value(0.6, 600)
    texts = [HeadText("a", "colors", 0.5, agreement=0.05, agreement_p=agreement_p_value(0.05, 600)),
             HeadText("b", "shapes", 0.3, agreement=strong, agreement_p=p_strong),
             HeadText("c", "colors", 0.1, agreement=None), HeadText("d", "shapes", 0.15, agreement=strong,
                                                                      agreement_p=p_strong)]
    label = lab.label(texts)       # evidence: shapes 0.45 x 0.6, the unchecked colour text 0.1 x 1
    assert label.property == "shapes" and label.confidence == pytest.approx(0.45 / 1.05)
    assert json.loads(label.raw)["votes"] == 2
    # the same correlation over 20 images is not beyond chance: nothing votes
    weak = [HeadText(t.text, t.tag, t.variance, t.agreement, agreement_p_value(t.agreement, 20))
            if t.agreement is not None else t for t in texts]
    assert agreement_p_value(0.6, 20) > 0.001 and lab.label(weak).property == MIXED
    assert agreement_p_value(0.6, 600) < 1e-40 and agreement_p_value(-0.3, 600) > 0.99


def test_llm_deadline_is_per_request_not_per_read(endpoint, make_llm):
    """A server that trickles its answer byte by byte (each read quick) is cut off at the total
    deadline and retried; the retries are bounded too."""
    endpoint.answer('{"property": "colors", "confidence": 1}', trickle=0.05)      # ~300 bytes: ~15 s
    llm = make_llm(timeout_s=0.5, max_retries=1)
    t0 = time.monotonic()
    with pytest.raises(LLMError, match="kept failing after 2 attempts"):
        llm.label(COLOR_HEAD)
    assert time.monotonic() - t0 < 4.0
    assert len(endpoint.requests) == 2


@pytest.mark.parametrize("body", [b"<html>Bad gateway</html>", b"", b'{"object": "list"}', b"[1, 2]"])
def test_llm_non_json_body_is_a_clear_error(endpoint, make_llm, body):
    endpoint.answer("", raw=body)
    with pytest.raises(LLMError, match="not a chat completion") as err:
        make_llm().label(COLOR_HEAD)
    assert "Expecting value" not in str(err.value) and "OPENAI_BASE_URL" in str(err.value)


@pytest.mark.parametrize("echo", [KEY, KEY.upper(), KEY[:8], KEY[:12] + "...", "Basic " + __import__("base64")
                                  .b64encode((":" + KEY).encode()).decode(),
                                  __import__("base64").b64encode(KEY.encode()).decode().rstrip("=")])
def test_llm_key_echoes_are_redacted_before_storing_or_printing(endpoint, make_llm, tmp_path, echo):
    endpoint.answer(f'{{"property": "colors", "confidence": 1, "note": "your key {echo} was used"}}')
    endpoint.answer(f"unauthorised key {echo}", status=401)
    label = make_llm().label(COLOR_HEAD)
    assert label.property == "colors" and "***" in label.raw
    with pytest.raises(LLMError) as err:
        make_llm().label([HeadText("another head", "colors", 0.3)])
    for text in (label.raw, str(err.value)):
        assert echo.lower() not in text.lower() and KEY[:8].lower() not in text.lower()
    assert_key_nowhere(tmp_path, label.raw, str(err.value))
    for f in tmp_path.rglob("*.json"):
        assert KEY[:8].lower() not in f.read_text().lower()


# --------------------------------------------------------------------------- issue 21: headers trickled, keys disguised

class TrickleHeaders:
    """A raw TCP server on 127.0.0.1 that answers every request with a status line and then one
    header line every ``every`` seconds, never ending its headers (each read is quick, the whole is not)."""

    def __init__(self, every: float = 0.5):
        import socket
        self.every, self.connections = every, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            i = 0
            while not self.stop.is_set():
                time.sleep(self.every)
                conn.sendall(f"X-Trickle-{i}: {'x' * 20}\r\n".encode())
                i += 1
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.fixture
def trickle_headers():
    server = TrickleHeaders(every=0.5)
    yield server
    server.close()


def test_llm_deadline_holds_when_the_headers_trickle(trickle_headers, tmp_path):
    """Break 5 of issue 21: one header line every 0.5 s kept a 3 s timeout waiting for 400 s. Each
    attempt is now cut at its wall-clock deadline, wherever the client is (here: reading headers)."""
    llm = LLMLabeler("test-model", api_key=KEY, base_url=trickle_headers.url, cache_dir=tmp_path / "llm",
                     timeout_s=1.5, max_retries=1, backoff_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(LLMError, match=r"kept failing after 2 attempts \(last: no complete answer within "
                                       r"--llm-timeout 1.5 s\)"):
        llm.label(COLOR_HEAD)
    took = time.monotonic() - t0
    assert 2 * 1.5 <= took < 2 * 1.5 + 1.0, took
    assert trickle_headers.connections == 2 and llm.requests == 2


def test_deadline_outside_the_main_thread_and_inside_another(tmp_path):
    """etl.deadline: in a worker thread (no signals) the caller stops waiting at the deadline; a
    deadline inside a longer one fires first and gives the outer one its remaining time back."""
    from etl.deadline import DeadlineExceeded, call_with_deadline
    got = {}

    def worker():
        t0 = time.monotonic()
        try:
            call_with_deadline(lambda: time.sleep(5), 0.3)
        except DeadlineExceeded as exc:
            got["took"], got["seconds"] = time.monotonic() - t0, exc.seconds
    t = threading.Thread(target=worker)
    t.start()
    t.join(3)
    assert 0.3 <= got["took"] < 1.0 and got["seconds"] == 0.3

    def inner_then_sleep():
        with pytest.raises(DeadlineExceeded) as inner:
            call_with_deadline(lambda: time.sleep(5), 0.2)
        assert inner.value.seconds == 0.2
        time.sleep(5)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded) as outer:
        call_with_deadline(inner_then_sleep, 0.6)
    assert outer.value.seconds == 0.6 and 0.6 <= time.monotonic() - t0 < 1.2
    assert call_with_deadline(lambda: 7, 1.0) == 7


SPACED = " ".join(KEY)
HEX = KEY.encode().hex()


@pytest.mark.parametrize("echo", [HEX, HEX.upper(), " ".join(HEX[i:i + 2] for i in range(0, len(HEX), 2)),
                                  SPACED, "-".join(KEY), KEY[::-1], " ".join(KEY[::-1]), HEX[:20],
                                  " ".join(KEY[:10])], ids=["hex", "HEX", "hex-spaced", "spaced", "dashed",
                                                            "reversed", "reversed-spaced", "hex-prefix",
                                                            "spaced-prefix"])
def test_llm_key_echoes_in_disguise_are_redacted(endpoint, make_llm, tmp_path, echo):
    """Break 12 of issue 21: the key echoed in hex, spaced out or reversed was stored in head_labels.raw."""
    endpoint.answer(f'{{"property": "colors", "confidence": 1, "note": "your key {echo} was used"}}')
    endpoint.answer(f"unauthorised key {echo}", status=401)
    label = make_llm().label(COLOR_HEAD)
    assert label.property == "colors" and "***" in label.raw
    with pytest.raises(LLMError) as err:
        make_llm().label([HeadText("another head", "colors", 0.3)])
    squash = lambda t: re.sub(r"[\W_]", "", t).lower()      # noqa: E731 - the text with every separator gone
    for text in (label.raw, str(err.value), *[f.read_text() for f in tmp_path.rglob("*.json")]):
        for form in (KEY, KEY[::-1], HEX):
            assert squash(form)[:8] not in squash(text), (form, text)
    assert "your key *** was used" in label.raw and "***" in str(err.value)
def test_an_agreement_must_beat_the_heads_strongest_disagreement():
    """v6: on a head where the rest of the model reads some text opposite to the head (strength s),
    agreements up to s are no evidence (a random-init model: every direction follows pixel
    statistics with an arbitrary sign)."""
    from etl.text.labelers import agreement_p_value
    p = agreement_p_value(0.9, 1000)
    def head(opposite):
        return [HeadText("three", "counting", 0.3, 0.95, p), HeadText("two", "counting", 0.2, 0.91, p),
                HeadText("sky", "backgrounds", 0.1, opposite, agreement_p_value(opposite, 1000)),
                HeadText("red", "colors", 0.1, 0.3, agreement_p_value(0.3, 1000))]
    lab, v5 = OfflineLabeler(), OfflineLabeler(symmetric=False)
    assert lab.label(head(-0.2)).property == "counting"          # a mild disagreement: 0.95 and 0.91 beat it
    assert v5.label(head(-0.97)).property == "counting"
    random_like = lab.label(head(-0.97))
    assert random_like.property == MIXED                          # 0.95 and 0.91 do not beat 0.97
    assert json.loads(random_like.raw)["disagreement"] == pytest.approx(0.97)
    assert lab.label(head(-0.93)).property == MIXED               # only 0.95 beats 0.93: one vote is no agreement
    assert lab.prompt_hash != v5.prompt_hash
    unchecked = [HeadText(h.text, h.tag, h.variance) for h in head(-0.97)]
    assert lab.label(unchecked).property == "counting"           # --no-agreement-check: nothing to compare with


def _checked(text, tag, variance, agreement):
    from etl.text.labelers import agreement_p_value
    return HeadText(text, tag, variance, agreement, agreement_p_value(agreement, 1000))


def test_a_propertys_own_texts_set_no_floor_for_it():
    """v7: the floor a vote must beat is the strongest disagreement among *other* properties' texts. A
    background head whose first text ("on white") the rest reads opposite (-0.56) keeps its other
    background texts' votes; v6 took the floor over every text and left the head 'mixed'."""
    head = [_checked("on white", "backgrounds", 0.5, -0.56), _checked("on grass", "backgrounds", 0.09, 0.29),
            _checked("a star", "shapes", 0.05, -0.07), _checked("on dots", "backgrounds", 0.02, 0.36),
            _checked("yellow", "colors", 0.05, -0.11)]
    v7, alike_only = OfflineLabeler(), OfflineLabeler(inverted=False, weighted=False)
    got = v7.label(head)
    assert got.property == "backgrounds"
    raw = json.loads(got.raw)
    assert raw["voting"] == [True, True, False, True, False]     # "on white" backs it: read opposite, above 0.11
    assert got.confidence == pytest.approx((0.5 + 0.09 + 0.02) / 0.71)
    assert OfflineLabeler(inverted=False).label(head).confidence == pytest.approx(0.11 / 0.71)
    # v6's floor (every text): 0.56, which no background text beats; v7's for backgrounds: the colour text's 0.11
    assert v7.disagreement(head) == pytest.approx(0.56) and v7.disagreement(head, "backgrounds") == pytest.approx(0.11)
    assert alike_only.label(head).property == "backgrounds"      # the own-property floor alone keeps two votes
    assert alike_only.prompt_hash != v7.prompt_hash


def test_a_reading_opposite_backs_a_property_but_never_creates_one():
    """A random-init head reads every counting text opposite (-0.5 to -0.97): no vote read alike, no label;
    and a reversed reading must beat every other property's |agreement|."""
    counting = [_checked("one", "counting", 0.18, -0.97), _checked("two", "counting", 0.06, -0.90),
                _checked("four", "counting", 0.09, -0.75), _checked("big", "sizes", 0.11, 0.70)]
    assert OfflineLabeler().label(counting).property == MIXED
    assert OfflineLabeler().voting(counting) == [False, False, False, False]
    backed = counting[:3] + [_checked("three", "counting", 0.05, 0.72), _checked("big", "sizes", 0.11, 0.70)]
    assert OfflineLabeler().voting(backed) == [True, True, True, True, False]
    strong_other = counting[:3] + [_checked("three", "counting", 0.05, 0.72), _checked("big", "sizes", 0.11, 0.93)]
    # read opposite, only -0.97 beats the sizes text's 0.93; read alike, 0.72 needs only beat other texts' disagreement
    assert OfflineLabeler().voting(strong_other) == [True, False, False, True, False]
    assert OfflineLabeler(inverted=False).voting(backed) == [False, False, False, True, False]


def test_evidence_is_variance_times_agreement():
    """v7: the winner and the majority weigh each voting text by how strongly the rest of the model shares
    its reading. A background head whose first text (counting, 0.31 of the variance) the model reads at 0.41
    and whose five background texts (0.40) it reads at 0.56-0.92: by variance alone counting holds 0.39 of
    the vote and background 0.50 (no majority, 'mixed'); by evidence background holds 0.68."""
    head = [_checked("one object", "counting", 0.31, 0.41), _checked("on white", "backgrounds", 0.21, 0.92),
            _checked("on grass", "backgrounds", 0.08, 0.82), _checked("on dots", "backgrounds", 0.05, 0.85),
            _checked("small", "sizes", 0.09, 0.37), _checked("on water", "backgrounds", 0.04, 0.80),
            _checked("on sky", "backgrounds", 0.02, 0.56)]
    got = OfflineLabeler().label(head)
    evidence = {"backgrounds": .21 * .92 + .08 * .82 + .05 * .85 + .04 * .80 + .02 * .56,
                "counting": .31 * .41, "sizes": .09 * .37}
    assert got.property == "backgrounds"
    assert json.loads(got.raw)["majority"] == pytest.approx(evidence["backgrounds"] / sum(evidence.values()), abs=1e-4)
    assert got.confidence == pytest.approx(0.40 / sum(h.variance for h in head))
    assert OfflineLabeler(weighted=False).label(head).property == MIXED       # 0.40 / 0.80 of the variance


# --------------------------------------------------------------------------- offline-v8: the zero-shot reading

def test_zeroshot_variance_is_the_adjusted_share_between_the_models_zero_shot_classes():
    from etl.text.labelers import zeroshot_classes, zeroshot_variance
    rng = np.random.default_rng(0)
    n, d = 400, 6
    colour = rng.integers(0, 3, n)                            # what the image shows
    Tc = np.eye(d)[:3]                                        # three colour texts, one per colour
    Ts = np.eye(d)[3:5]                                       # two shape texts
    Z = np.eye(d)[colour] + 0.1 * rng.normal(size=(n, d))     # the model reads the colour
    classes = zeroshot_classes(Z, np.vstack([Tc, Ts]), ["colors"] * 3 + ["shapes"] * 2, ["colors", "shapes", "sizes"])
    assert set(classes) == {"colors", "shapes"}               # no texts, no reading
    assert (classes["colors"] == colour).all()
    head = 2.0 * np.eye(d)[colour] + 0.5 * rng.normal(size=(n, d))
    e = zeroshot_variance(head, classes)
    X = head - head.mean(0)
    between = sum((colour == v).sum() * np.sum(X[colour == v].mean(0) ** 2) for v in range(3))
    eta2 = between / np.sum(X ** 2)
    assert e["colors"] == pytest.approx(1 - (1 - eta2) * (n - 1) / (n - 3))
    assert e["colors"] > 0.5 and abs(e["shapes"]) < 0.05     # random groups explain about nothing
    assert zeroshot_variance(np.zeros((n, d)), classes) == {"colors": 0.0, "shapes": 0.0}
    # more classes than a third of the images: the most frequent keep a group each, the rest share one
    from etl.text.labelers import group_classes
    assert group_classes(np.array([7, 3, 3, 9, 7, 3, 5]), 3).tolist() == [1, 0, 0, 2, 1, 0, 2]
    assert group_classes(np.array([4, 2, 4]), 3).tolist() == [1, 0, 1]          # few classes: one group each
    few = np.array([0, 1, 2, 0, 1, 3, 4, 5, 6, 0, 1, 2])                         # 7 classes, 12 images: 4 groups
    pooled = np.where(np.isin(few, [0, 1, 2]), few, 3)
    assert zeroshot_variance(head[:12], {"colors": few}) == pytest.approx(zeroshot_variance(head[:12], {"colors": pooled}))
    from etl.text.labelers import zeroshot_images
    assert (zeroshot_images(10, limit=20) == np.arange(10)).all()
    rows = zeroshot_images(1_000_001, limit=1000)
    assert len(rows) == 1000 and rows[0] == 0 and rows[-1] == 1_000_000 and (np.diff(rows) > 0).all()


def test_offline_v8_labels_by_the_zero_shot_reading_when_it_stands_out():
    lab = OfflineLabeler(["colors", "shapes", "positions"])
    head = [HeadText("a red shape", "colors", 0.3, -0.62, 1.0), HeadText("top left", "positions", 0.2, 0.69, 1e-9),
            HeadText("a blue shape", "colors", 0.1, 0.09, 0.02), HeadText("a square", "shapes", 0.1, 0.4, 1e-9)]
    assert lab.label(head).property == MIXED                  # v7 without zero-shot variances: split votes
    got = lab.label(head, zeroshot={"colors": 0.67, "positions": 0.17, "shapes": 0.13})
    assert got.property == "colors" and got.confidence == pytest.approx(0.4 / 0.7)
    raw = json.loads(got.raw)
    assert raw["version"] == "offline-v8" and raw["zeroshot_best"] == "colors" and raw["v7"]["property"] == MIXED
    # below the minimum, or not 1.5 times the next property (a common driver: a random-init model)
    assert lab.label(head, zeroshot={"colors": 0.3, "positions": 0.1}).property == MIXED
    assert lab.label(head, zeroshot={"colors": 0.9, "positions": 0.88, "shapes": 0.85}).property == MIXED
    assert OfflineLabeler(["colors", "shapes", "positions"], zeroshot_ratio=1.02).label(
        head, zeroshot={"colors": 0.9, "positions": 0.88}).property == "colors"
    # the property must be named by one of the head's texts
    assert lab.label(head[1:2], zeroshot={"colors": 0.67, "positions": 0.1}).property == MIXED
    # the rule is flag-gated: zeroshot=False keeps v7's vote, and so does a head without variances
    assert OfflineLabeler(["colors", "shapes", "positions"], zeroshot=False).label(
        head, zeroshot={"colors": 0.67}).property == MIXED
    assert lab.prompt_hash != OfflineLabeler(["colors", "shapes", "positions"], zeroshot=False).prompt_hash
    with pytest.raises(ValueError):
        OfflineLabeler(zeroshot_ratio=0.5)
    with pytest.raises(ValueError):
        OfflineLabeler(zeroshot_min=0.0)
