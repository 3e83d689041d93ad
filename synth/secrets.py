"""Keep credentials out of every output, log and error.

Three kinds of secret reach rlaif-forge: the API key read from the env var named by `llm.api_key_env`,
credentials written into a URL (`http://user:key@host/v1`), and a key pasted by mistake where an
env-var NAME belongs. `scrub(text)` removes all three from any text (error messages, manifest fields):
every registered key and every prefix of it of `MIN_FRAGMENT` or more characters (a server may quote a
key that a message cut then truncates), and the userinfo part of every URL. `redact_config(tree)` does
the same for a config tree before it is saved. Scrub BEFORE truncating a message, never after.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***REDACTED***"
MIN_FRAGMENT = 8  # a quoted prefix this long or longer is treated as the key itself
_SECRET_KEY = re.compile(r"(api_?key|token|secret|password|passwd|authorization|credentials?)$", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KNOWN: set[str] = set()


def register(secret: str | None) -> None:
    """Remember a secret value (e.g. the API key a backend just read) so that `scrub` removes it."""
    if secret and secret != "EMPTY" and len(secret) >= 4:
        _KNOWN.add(secret)


def looks_like_key(value: str) -> bool:
    """True when a value given as an env-var NAME is more likely the key itself: not a valid env-var
    name (`sk-...`, `hf_...` with dashes, base64), or a long run of letters and digits without the
    underscores or upper case that env-var names have (a hex or base62 token)."""
    if not value:
        return False
    if not _ENV_NAME.fullmatch(value):
        return True
    token_like = len(value) >= 24 and "_" not in value and any(c.isdigit() for c in value)
    return token_like and not value.isupper()


def _strip_key(text: str, key: str) -> str:
    """Replace `key` and every prefix of it of MIN_FRAGMENT+ characters (e.g. a quote cut mid-key)."""
    if len(key) < MIN_FRAGMENT:
        return text.replace(key, "***")
    head, out, i = key[:MIN_FRAGMENT], [], 0
    while (j := text.find(head, i)) >= 0:
        end = j + MIN_FRAGMENT
        while end < len(text) and end - j < len(key) and text[end] == key[end - j]:
            end += 1
        out.append(text[i:j] + "***")
        i = end
    out.append(text[i:])
    return "".join(out)


def strip_url_credentials(text: str) -> str:
    """`http://user:key@host/v1` -> `http://***@host/v1` (anywhere in a text)."""
    return _URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", text)


def scrub(text: str, *extra: str | None) -> str:
    """`text` without any registered secret (or `extra` ones), their 8+ character prefixes, or URL
    credentials."""
    if not text:
        return text
    for key in sorted({*_KNOWN, *(e for e in extra if e and e != "EMPTY")}, key=len, reverse=True):
        text = _strip_key(text, key)
    return strip_url_credentials(text)


def redact_config(obj: Any, key: str = "") -> Any:
    """A copy of a config tree fit to save: values under secret-looking keys (`api_key`, `token`, ...)
    replaced, an `*_env` value that is a key rather than a variable name replaced, URL credentials and
    registered secrets scrubbed. Names of env vars are kept."""
    if isinstance(obj, dict):
        return {k: redact_config(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_config(v, key) for v in obj]
    if obj and _SECRET_KEY.search(key):
        return REDACTED
    if isinstance(obj, str):
        if key.endswith("_env") and looks_like_key(obj):
            return REDACTED
        return scrub(obj)
    return obj
