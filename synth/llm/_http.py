"""Transports for `llm=openai` (see synth/llm/openai.py): one POST of a chat-completions body to one
base URL, returning the decoded JSON or raising `Retryable` / `FatalHTTP`. No retries here: the backend
owns them. Each endpoint holds the API key privately (it is in no repr, message or log line) and keeps
`busy` / `served` counters for least-busy load spreading.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import ssl
import time
import zlib
from typing import Any
from urllib.parse import urlsplit

from synth.secrets import scrub

_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+


class Retryable(Exception):
    """A transient failure. `reason` is one of "429", "5xx", "408", "409", "timeout", "connection",
    "malformed" (the stats key); `retry_after` the server's Retry-After in seconds, if any."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason, self.retry_after = reason, retry_after

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}"


class FatalHTTP(Exception):
    """Not worth retrying. `abort`: the whole call is wrong (bad key, URL, model, n unsupported);
    otherwise only this request is (e.g. longer than the server's context)."""

    def __init__(self, status: int, message: str, abort: bool = False) -> None:
        super().__init__(message)
        self.status, self.abort = status, abort


def redact(text: str, key: str) -> str:
    """`text` without the key, any 8+ character prefix of it, or URL credentials (synth.secrets)."""
    return scrub(text, key)


def _retry_after(headers: Any) -> float | None:
    """Retry-After as seconds: `retry-after-ms`, `retry-after` seconds, or an HTTP date."""
    if (ms := headers.get("retry-after-ms")) is not None:
        with contextlib.suppress(ValueError):
            return float(ms) / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return max(when.timestamp() - time.time(), 0.0) if when else None


def _server_message(text: str, key: str) -> str:
    """The server's error message, secrets removed FIRST, then cut to 300 characters (cutting first
    could leave a fragment of a quoted key that no longer matches the whole key)."""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        err = json.loads(text).get("error")
        return redact(str(err.get("message") if isinstance(err, dict) else err), key)[:300]
    return redact(text, key)[:300]


def classify_status(status: int, headers: Any, text: str, key: str) -> Exception:
    """The exception for a non-2xx answer (returned, for the caller to raise)."""
    if status in (401, 403):  # the server's message may quote part of the key: leave it out
        return FatalHTTP(
            status, f"HTTP {status}: authentication failed (check the env var named by llm.api_key_env)", True
        )
    msg = _server_message(text, key)
    if status == 429:
        return Retryable("429", f"HTTP 429: {msg}", _retry_after(headers))
    if status >= 500:
        return Retryable("5xx", f"HTTP {status}: {msg}", _retry_after(headers))
    if status in (408, 409):
        return Retryable(str(status), f"HTTP {status}: {msg}")
    if status == 404:
        return FatalHTTP(404, f"HTTP 404: {msg} (check llm.base_url ends with /v1 and model.name_or_path)", True)
    return FatalHTTP(status, f"HTTP {status}: {msg}")


def decode_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise Retryable("malformed", f"invalid JSON body ({len(data)} bytes)") from None


class _Endpoint:
    def __init__(self, url: str, api_key: str, timeout_s: float) -> None:
        self.url, self._key, self._timeout = url, api_key, timeout_s
        self.busy = self.served = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    async def post_chat(self, body: dict) -> Any:
        self.busy += 1
        try:
            return await self._post(body)
        finally:
            self.busy -= 1
            self.served += 1

    async def _post(self, body: dict) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    async def aclose(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class LeanEndpoint(_Endpoint):
    """HTTP/1.1 over asyncio streams: keep-alive pool, Content-Length / chunked / read-to-close bodies,
    gzip, TLS for https. No proxy support (transport=auto sends proxied URLs to the SDK)."""

    def __init__(self, url: str, api_key: str, timeout_s: float, max_connections: int) -> None:
        super().__init__(url, api_key, timeout_s)
        parts = urlsplit(url)
        https = parts.scheme == "https"
        self._addr = (parts.hostname, parts.port or (443 if https else 80))
        self._ssl = ssl.create_default_context() if https else None
        host = parts.netloc.rsplit("@", 1)[-1]
        path = parts.path.rstrip("/") + "/chat/completions"
        self._head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {api_key}\r\n"
            "Content-Type: application/json\r\nAccept: application/json\r\nAccept-Encoding: gzip\r\n"
            "User-Agent: rlaif-forge\r\n"
        ).encode()
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _post(self, body: dict) -> Any:
        payload = json.dumps(body).encode()
        try:
            if _timeout is not None:  # 3.11+: no extra task per request (wait_for makes one)
                async with _timeout(self._timeout):
                    status, headers, data = await self._exchange(payload)
            else:
                status, headers, data = await asyncio.wait_for(self._exchange(payload), self._timeout)
        except asyncio.TimeoutError:  # before OSError: TimeoutError is an OSError on 3.11+
            raise Retryable("timeout", f"no answer within {self._timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise Retryable("connection", f"{type(exc).__name__}: {exc}") from None
        if 200 <= status < 300:
            return decode_json(data)
        raise classify_status(status, headers, data.decode("utf-8", "replace"), self._key)

    async def _exchange(self, payload: bytes) -> tuple[int, dict[str, str], bytes]:
        reader, writer = await self._connection()
        try:
            writer.write(self._head + b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            await writer.drain()
            status, headers = await _read_head(reader)
            try:
                data = await _read_body(reader, headers)
            except asyncio.IncompleteReadError:
                raise Retryable("malformed", "truncated response body") from None
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close" or _reads_to_close(headers):
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status, headers, _decompress(data, headers.get("content-encoding", ""))

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():  # the server may have closed it
                return reader, writer
            writer.close()
        host, port = self._addr
        return await asyncio.open_connection(host, port, ssl=self._ssl, limit=2**20)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


def _reads_to_close(headers: dict[str, str]) -> bool:
    return "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "").lower()


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            parts.append((await reader.readexactly(size + 2))[:-2])
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()


def _decompress(data: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompress(data)
    return data


# Fields the SDK's chat.completions.create takes by name; everything else goes in extra_body.
_SDK_FIELDS = {
    "model",
    "messages",
    "n",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "stop",
    "logprobs",
    "top_logprobs",
    "response_format",
}


class SDKEndpoint(_Endpoint):
    """The `openai` AsyncOpenAI client with its own retries off (max_retries=0)."""

    def __init__(self, url: str, api_key: str, timeout_s: float, max_connections: int) -> None:
        import openai

        super().__init__(url, api_key, timeout_s)
        self._openai = openai
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=url,
            max_retries=0,
            timeout=timeout_s,
            http_client=_sdk_http_client(openai, max_connections),
        )

    async def _post(self, body: dict) -> Any:
        oa = self._openai
        std = {k: v for k, v in body.items() if k in _SDK_FIELDS}
        extra = {k: v for k, v in body.items() if k not in _SDK_FIELDS}
        try:
            raw = await self._client.chat.completions.with_raw_response.create(**std, extra_body=extra or None)
        except oa.APITimeoutError:
            raise Retryable("timeout", f"no answer within {self._timeout:g}s") from None
        except oa.APIConnectionError as exc:
            raise Retryable("connection", f"{type(exc).__name__}: {redact(str(exc), self._key)}") from None
        except oa.APIStatusError as exc:
            raise classify_status(exc.status_code, exc.response.headers, exc.response.text, self._key) from None
        return decode_json(raw.content)

    async def aclose(self) -> None:
        await self._client.close()


def _sdk_http_client(openai: Any, max_connections: int) -> Any:
    """The SDK's own http client class with a pool as large as our concurrency (the default keeps only
    100 idle connections, so higher concurrency would reconnect on every request)."""
    try:
        from openai._constants import DEFAULT_CONNECTION_LIMITS

        limits = type(DEFAULT_CONNECTION_LIMITS)(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        return openai.DefaultAsyncHttpxClient(limits=limits)
    except (ImportError, AttributeError, TypeError):  # another SDK layout: its defaults are fine
        return None
