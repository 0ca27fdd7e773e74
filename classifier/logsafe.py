"""Outside strings made safe to log: control characters escaped, credentials taken out of URLs.

Used wherever a request-derived string or a configured URL reaches a log line, an error message or the
database: the classifier's server and client, and the bot.
"""

from __future__ import annotations

import logging
import re

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

# C0 and C1 controls (newlines included), DEL, Unicode line/paragraph separators, and lone surrogates
# (which a UTF-8 log stream cannot even write).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# [scheme://]userinfo@ : the userinfo ends at the last "@" before the path, query or fragment (RFC 3986)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)?[^/?#]*@")


def escape_controls(value: object) -> str:
    """``value`` as one line: a newline becomes ``\\n``, ESC ``\\x1b``, and so on, so nothing it holds can
    start a forged log line or drive a terminal."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode(), str(value))


def redact_url(url: str) -> str:
    """``url`` without its user and password (``http://***@host/...``): fit for logs and messages."""
    return _USERINFO.sub(lambda m: f"{m.group(1) or ''}***@", url)


class AccessLogger(AbstractAccessLogger):
    """Method, path (no query string: a page link may carry a token), status, duration; never headers.

    The path is escaped: aiohttp decodes it, so ``%0A`` would otherwise end the line and let a request
    write a line of its own into the log.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %.1fms",
            escape_controls(request.method),
            escape_controls(request.path),
            response.status,
            time * 1000,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
