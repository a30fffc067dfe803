# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""A small client for the llmfleet agent's control routes, for llmfleet.aws's modules.

GET /agent/idle, POST /agent/drain and POST /agent/resume with an operator key (docs/api.md), over
ansible.module_utils.urls (the standard library underneath: nothing to install on the managed host).

AgentClient.request() returns any HTTP answer and raises AgentUnreachable when there is none (connection
refused, timeout, TLS failure). The route methods check the answer: they raise KeyRefused for 401/403,
UnexpectedAnswer for any other status they do not expect or a body that is not the agent's figures, and
return an Answer whose `figures` are the idle figures, normalised.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit

from ansible.module_utils.basic import env_fallback
from ansible.module_utils.urls import ConnectionError as UrlsConnectionError
from ansible.module_utils.urls import open_url
from ansible_collections.llmfleet.aws.plugins.module_utils.idle_rules import idle_figures

IDLE_PATH = "/agent/idle"
DRAIN_PATH = "/agent/drain"
RESUME_PATH = "/agent/resume"
SCHEMES = ("http", "https")
# how much of a body that is not the agent's JSON goes into a message
EXCERPT = 200


class AgentError(Exception):
    """Asking the agent did not give a usable answer; the message says why, naming the agent's URL."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class AgentUnreachable(AgentError):
    """No HTTP answer at all: refused, timed out, TLS failure, a connection cut before the answer."""


class KeyRefused(AgentError):
    """The agent answered 401 or 403 to the operator key."""


class UnexpectedAnswer(AgentError):
    """An HTTP status the route does not give, or a body that is not what the route answers."""


class Answer:
    """One HTTP answer: its status, the decoded body (a dict when it was a JSON object, else the text)."""

    def __init__(self, status: int, body: object, figures: dict | None = None) -> None:
        self.status = status
        self.body = body
        self.figures = figures

    @property
    def error(self) -> str:
        """The agent's `error` message, or an excerpt of a body that is not its JSON."""
        if isinstance(self.body, dict):
            return str(self.body.get("error", ""))
        return str(self.body)[:EXCERPT]


def base_url(url: str) -> str:
    """`url` without trailing slashes; ValueError naming it unless it is an http(s) URL with a host."""
    text = (url or "").strip()
    try:
        parts = urlsplit(text)
        # .port raises ValueError for a port that is not a number in 0-65535
        valid = parts.scheme.lower() in SCHEMES and bool(parts.hostname) and parts.port != 0
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(
            f"url must be an http:// or https:// URL of the agent, such as https://10.0.1.5:8443; got {url!r}"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"url must not have a query or fragment; got {url!r}")
    return text.rstrip("/")


def connection_argument_spec() -> dict:
    """The options of every module that asks agents: the operator key (else LLMFLEET_OPERATOR_KEY), TLS
    verification with an optional CA file, and the seconds per request."""
    return dict(
        operator_key=dict(
            type="str", required=True, no_log=True, fallback=(env_fallback, ["LLMFLEET_OPERATOR_KEY"])
        ),
        validate_certs=dict(type="bool", default=True),
        ca_path=dict(type="path"),
        timeout=dict(type="float", default=10.0),
    )


def connection_problems(params: dict) -> list[str]:
    """What is wrong with the options of connection_argument_spec that the spec cannot check, each naming
    the option and its value; empty when nothing is."""
    problems = []
    if not params["operator_key"]:
        problems.append("operator_key is empty: set it, or the environment variable LLMFLEET_OPERATOR_KEY")
    if not params["timeout"] > 0:
        problems.append(f"timeout must be more than 0 seconds; got {params['timeout']!r}")
    ca_path = params["ca_path"]
    if ca_path and params["validate_certs"] and not Path(ca_path).is_file():
        problems.append(f"ca_path {ca_path} is not a file")
    return problems


def describe_failure(exc: BaseException, timeout: float) -> str:
    """Why a request got no answer, in a few words (never the request's headers)."""
    if isinstance(exc, URLError) and not isinstance(exc, HTTPError):
        reason = exc.reason
        return describe_failure(reason, timeout) if isinstance(reason, BaseException) else str(reason)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, http.client.HTTPException):
        return f"the connection broke before a complete answer ({type(exc).__name__}: {exc})"
    return str(exc) or type(exc).__name__


def decode(raw: bytes) -> object:
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def error_body(err: HTTPError) -> bytes:
    """The body of an HTTP error answer; empty when there is none to read."""
    try:
        return err.read() or b""
    except (AttributeError, OSError, http.client.HTTPException):
        return b""
    finally:
        err.close()


class AgentClient:
    """The control routes of one agent, asked with an operator key."""

    def __init__(
        self,
        url: str,
        operator_key: str,
        validate_certs: bool = True,
        ca_path: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url = base_url(url)
        self._key = operator_key
        self.validate_certs = validate_certs
        self.ca_path = ca_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: object = None) -> Answer:
        """One request; any HTTP answer is returned. Raises AgentUnreachable when there is none."""
        headers = {"Authorization": f"Bearer {self._key}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            try:
                with open_url(
                    self.url + path,
                    data=data,
                    headers=headers,
                    method=method,
                    timeout=self.timeout,
                    validate_certs=self.validate_certs,
                    ca_path=self.ca_path if self.validate_certs else None,
                    follow_redirects="none",  # the key goes to this agent only
                    use_netrc=False,  # the Authorization header is ours
                    http_agent="llmfleet.aws",
                ) as response:
                    return Answer(response.status, decode(response.read()))
            except HTTPError as err:
                return Answer(err.code, decode(error_body(err)))
        except (URLError, UrlsConnectionError, OSError, http.client.HTTPException) as exc:
            raise AgentUnreachable(
                f"cannot reach the llmfleet agent at {self.url} ({method} {path}):"
                f" {describe_failure(exc, self.timeout)}"
            ) from None

    def _checked(self, answer: Answer, method: str, path: str, expected: tuple[int, ...]) -> Answer:
        where = f"the llmfleet agent at {self.url} ({method} {path})"
        if answer.status in (401, 403):
            raise KeyRefused(
                f"{where} refused the operator key: HTTP {answer.status}: {answer.error}", answer.status
            )
        if answer.status not in expected:
            raise UnexpectedAnswer(
                f"{where} answered HTTP {answer.status}: {answer.error or '(no error message)'}",
                answer.status,
            )
        answer.figures = idle_figures(answer.body)
        if answer.figures is None:
            raise UnexpectedAnswer(
                f"{where} answered HTTP {answer.status} without the idle figures:"
                f" {str(answer.body)[:EXCERPT]}",
                answer.status,
            )
        return answer

    def idle(self) -> Answer:
        """GET /agent/idle: 200 and the figures."""
        return self._checked(self.request("GET", IDLE_PATH), "GET", IDLE_PATH, (200,))

    def drain(self, if_idle_for: float | None = None) -> Answer:
        """POST /agent/drain: 200 when draining (now or already), 409 when not drained; figures either way.

        With `if_idle_for` the agent drains only when nothing is in flight and it has been idle that
        long, deciding and refusing new work in one step; the 409's `error` says why it did not.
        """
        body = {} if if_idle_for is None else {"if_idle_for": if_idle_for}
        return self._checked(self.request("POST", DRAIN_PATH, body), "POST", DRAIN_PATH, (200, 409))

    def resume(self) -> Answer:
        """POST /agent/resume: 200 and the figures; the agent's idle time counts again from now."""
        return self._checked(self.request("POST", RESUME_PATH, {}), "POST", RESUME_PATH, (200,))
