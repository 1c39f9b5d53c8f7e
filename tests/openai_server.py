"""A small OpenAI- and Anthropic-compatible HTTP server for tests, backed by a real local model.

/v1/completions (with echo + logprobs: the prompt's own token log-probabilities), /v1/chat/completions and
/v1/messages. `fail_first` answers that many requests with 429 first, to exercise retries; `chat_only` answers
/v1/completions with 404, like a chat-only API. Every request is counted in `hits`.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Backend:
    def __init__(self, model):
        self.model = model          # fmkit.providers.local.LocalModel
        self.hits = []
        self.fail_first = 0
        self.chat_only = False
        self.lock = threading.Lock()

    def completion(self, body):
        from fmkit.providers import GenRequest

        m = self.model
        prompt = body["prompt"]
        ids = m.enc(prompt)
        choice = {"index": 0, "finish_reason": "length", "logprobs": None}
        if body.get("echo"):
            import torch

            # like a real server: each prompt token given the ones before it; the first has no log-probability
            with torch.inference_mode():
                logp = torch.log_softmax(m.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            lps = [None] + [logp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]
            greedy = [None] + logp[:-1].argmax(-1).tolist()
            pieces = [m.tok.decode([i]) for i in ids]
            offsets, pos = [], 0
            for p in pieces:
                offsets.append(pos)
                pos += len(p)
            top = [None] + [{m.tok.decode([g]): 0.0} for g in greedy[1:]]
            choice["logprobs"] = {"tokens": pieces, "token_logprobs": lps, "text_offset": offsets,
                                  "top_logprobs": top}
            choice["text"] = prompt
        else:
            out = m.generate([GenRequest(prompt, body.get("stop") or [], body.get("max_tokens", 16),
                                         body.get("temperature", 0.0))])[0]
            choice["text"] = out
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [choice], "usage": {"prompt_tokens": len(ids), "completion_tokens": 1,
                                               "total_tokens": len(ids) + 1}}

    def chat_text(self, messages):
        last = messages[-1]["content"]
        if "[[rating]]" in last:                       # a single-answer judge
            return "I cannot tell." if "UNRATEABLE" in last else "Solid answer. Rating: [[7]]"
        if "[[A]]" in last:                            # a pairwise judge
            if "FAIR" in last:                         # judges on content: prefers the answer saying GOOD
                a = last.split("[Answer of assistant A]")[1].split("[Answer of assistant B]")[0]
                return "[[A]]" if "GOOD" in a else "[[B]]"
            return "[[A]]"                             # a judge with pure position bias
        return "B" if "Answer with the letter" in last else f"echo: {last[-40:]}"


def start(model):
    backend = Backend(model)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code, doc):
            data = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with backend.lock:
                backend.hits.append(self.path)
                if backend.fail_first > 0:
                    backend.fail_first -= 1
                    return self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}})
            if self.path == "/v1/completions":
                if backend.chat_only:
                    return self._send(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
                return self._send(200, backend.completion(body))
            if self.path == "/v1/chat/completions":
                text = backend.chat_text(body["messages"])
                return self._send(200, {"id": "chat-1", "object": "chat.completion", "created": 0,
                                        "model": body["model"], "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": text}}],
                                        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}})
            if self.path == "/v1/embeddings":
                vec = backend.model.embed([body["input"]])[0].tolist()
                return self._send(200, {"object": "list", "model": body["model"], "data": [
                    {"object": "embedding", "index": 0, "embedding": vec}],
                    "usage": {"prompt_tokens": 3, "total_tokens": 3}})
            if self.path == "/v1/messages":
                text = backend.chat_text(body["messages"])
                return self._send(200, {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                                        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                                        "stop_sequence": None, "usage": {"input_tokens": 7, "output_tokens": 3}})
            return self._send(404, {"error": {"message": "no route"}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, backend, f"http://127.0.0.1:{server.server_address[1]}"
