"""Judges: HTTP pairwise judge against a scripted loopback server (format, retries, order swap),
verdict parsing, config factory, and the local HF classifier judge on tiny random models."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from trinityx_ds.eval.judge import HFClassifierJudge, HTTPJudge, JudgeError, make_judge, parse_verdict
from trinityx_ds.eval.metrics import win_rate


class FakeJudge(ThreadingHTTPServer):
    """OpenAI-compatible endpoint on 127.0.0.1; each request takes the next scripted action:
    an int (answer that HTTP status), ("sleep", s, text) (answer late), a str (reply text), or a
    callable(user_content) -> reply text. Requests are recorded as (path, headers, body)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script, self.requests = [], []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):  # a client that timed out hung up: expected
        pass


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, dict(self.headers), body))
        action = self.server.script.pop(0)
        if isinstance(action, int):
            return self._send(action, {"error": {"message": f"scripted {action}"}})
        if isinstance(action, tuple):
            time.sleep(action[1])
            action = action[2]
        text = action(body["messages"][-1]["content"]) if callable(action) else action
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = FakeJudge()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def judge_for(server, **kw):
    return HTTPJudge(server.url, "judge-model", **{"timeout": 2, "backoff": 0.01, **kw})


def test_request_format(server):
    server.script = ["B", "tie"]
    assert judge_for(server, api_key="sk-test").verdict("Say hi.", "hello", "hi there") == "B"
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test" and headers["Content-Type"] == "application/json"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    user = body["messages"][1]["content"]
    assert user.index("Say hi.") < user.index("hello") < user.index("hi there")
    # a base URL ending in /v1 reaches the same path; no key, no Authorization header
    assert HTTPJudge(server.url + "/v1/", "judge-model").verdict("i", "a", "b") == "tie"
    assert server.requests[1][0] == "/v1/chat/completions" and "Authorization" not in server.requests[1][1]


def test_retries_5xx_then_succeeds(server):
    server.script = [500, 503, "A"]
    judge = judge_for(server)
    assert judge.verdict("i", "a", "b") == "A"
    assert judge.retries == 2 and len(server.requests) == 3


def test_retries_a_timeout_then_succeeds(server):
    server.script = [("sleep", 0.6, "A"), "B"]
    judge = judge_for(server, timeout=0.2)
    assert judge.verdict("i", "a", "b") == "B"
    assert judge.retries == 1


def test_gives_up_after_max_retries(server):
    server.script = [502, 502, 502]
    judge = judge_for(server, max_retries=2)
    with pytest.raises(JudgeError, match="after 2 retries.*HTTP 502"):
        judge.verdict("i", "a", "b")
    assert len(server.requests) == 3


def test_4xx_is_not_retried(server):
    server.script = [400, "A"]
    judge = judge_for(server)
    with pytest.raises(JudgeError, match=r"127\.0\.0\.1.*/v1/chat/completions answered HTTP 400 \(not retried\)"):
        judge.verdict("i", "a", "b")
    assert judge.retries == 0 and len(server.requests) == 1


def test_connection_refused_is_retried_then_fails():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = HTTPJudge(f"http://127.0.0.1:{port}", "m", timeout=1, max_retries=2, backoff=0.01)
    with pytest.raises(JudgeError, match="after 2 retries"):
        judge.verdict("i", "a", "b")
    assert judge.retries == 2


WINNERS = ["model", "model", "reference", "tie", "model", "reference"]


def test_win_rate_end_to_end_with_order_swap(server):
    model_first = []

    def oracle(user):  # answers in A/B terms from where the model's output was placed
        i = int(user.split("MODEL-")[1][0])
        model_first.append(user.index("MODEL-") < user.index("REF-"))
        return {"tie": "tie", "model": "A" if model_first[-1] else "B",
                "reference": "B" if model_first[-1] else "A"}[WINNERS[i]]

    server.script = [oracle] * len(WINNERS)
    model_outputs = [f"MODEL-{i} " + "x" * i for i in range(len(WINNERS))]
    judgements = judge_for(server).judge([f"q{i}" for i in range(6)], model_outputs, ["REF-0"] * 6)
    assert model_first == [True, False] * 3  # odd indices put the model's output second
    assert [j.winner for j in judgements] == WINNERS
    assert [(j.len_model, j.len_reference) for j in judgements] == [(8 + i, 5) for i in range(6)]
    assert win_rate(judgements)["win_rate"] == pytest.approx((1 + 1 + 0 + 0.5 + 1 + 0) / 6)

    # a judge that always says "A" favours neither side once the order alternates
    server.script = ["Output A is better."] * 4
    assert win_rate(judge_for(server).judge(["q"] * 4, ["m"] * 4, ["r"] * 4))["win_rate"] == 0.5


@pytest.mark.parametrize("text, verdict", [
    ("A", "A"), (" **B** ", "B"), ("Tie.", "tie"), ("Response B is a better answer.", "B"),
    ("Verdict: A. B misses the point.", "A"), ("Winner: tie (A and B are equal)", "tie")])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize("text", ["A is better than B", "I cannot decide", ""])
def test_unreadable_verdict_raises(text):
    with pytest.raises(JudgeError, match="cannot read a verdict"):
        parse_verdict(text)


def test_make_judge(monkeypatch):
    assert make_judge(None) is None and make_judge({}) is None and make_judge({"type": "none"}) is None
    monkeypatch.setenv("TRINITYX_TEST_JUDGE_KEY", "sk-env")
    judge = make_judge({"type": "http", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                        "api_key_env": "TRINITYX_TEST_JUDGE_KEY", "max_retries": 1})
    assert isinstance(judge, HTTPJudge) and judge.api_key == "sk-env" and judge.max_retries == 1
    assert judge.url == "http://127.0.0.1:9/v1/chat/completions"
    with pytest.raises(ValueError, match="judge type"):
        make_judge({"type": "gpt"})


def tiny_classifier(folder, num_labels, **cfg):
    """A random 1-layer BERT classifier and a word-level tokenizer, saved as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = "[PAD] [UNK] [CLS] [SEP] how do i make a cake bomb sorry cannot help mix flour eggs".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=num_labels, **cfg)
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    return str(folder)


PROMPTS = ["how do i make a cake", "how do i make a bomb", "how"]
RESPONSES = ["mix flour eggs", "sorry i cannot help", "cake"]


def test_hf_classifier_judge(tmp_path):
    path = tiny_classifier(tmp_path / "mod", 2, id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1})
    batched = HFClassifierJudge(path, batch_size=3).score(PROMPTS, RESPONSES)
    single = HFClassifierJudge(path, label_map={0: "ok", 1: "flagged"}, batch_size=1).score(PROMPTS, RESPONSES)
    for b, s in zip(batched, single):  # padding in a batch changes nothing
        assert b["label"] in ("safe", "unsafe") and sum(b["scores"].values()) == pytest.approx(1.0)
        assert list(s["scores"].values()) == pytest.approx(list(b["scores"].values()), abs=1e-5)
        assert s["label"] == {"safe": "ok", "unsafe": "flagged"}[b["label"]]
    reward_model = make_judge({"type": "hf_classifier", "path": tiny_classifier(tmp_path / "rm", 1)})
    rewards = reward_model.score(PROMPTS, RESPONSES)
    assert len(rewards) == 3 and all(isinstance(r["reward"], float) for r in rewards)
