"""Document parsing in a separate process, with a time and a memory limit.

A document is whatever a writer uploads: a PDF can hold a decompression bomb, thousands of
pages, or a structure that keeps the parser busy for hours. Parsed in the service's own
process, one such document stalls its partition forever (a hang) or kills the service on
every redelivery (an out-of-memory crash loop). :class:`SandboxedParser` runs
:func:`~services.retrieval.parsing.parse_document` in a child process
(``python -m services.retrieval.sandbox``) that limits its own address space and CPU time
before it reads the document, and kills it when the wall-clock limit passes.

Outcomes:
- the parsed document;
- a :class:`~services.retrieval.parsing.ParseError` the parser raised (the same class and
  message as in-process: an unsupported type, too many pages, an unreadable PDF...);
- :class:`ParserKilled`: the child ran out of time or memory, or crashed. The ingestion
  dead-letters such a document rather than trying it again and again.

Protocol with the child: stdin is one line of JSON (content type, title, limits), then the
document's bytes; stdout is one JSON object, ``{"document": {...}}`` or
``{"error": {"kind": <ParseError subclass>, "message": ...}}``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.retrieval.parsing import ParsedDocument, ParseError, ParserKilled

WORKER = (sys.executable, "-m", "services.retrieval.sandbox")
_OUT_OF_MEMORY = 3  # the child's exit status when an allocation failed


@dataclass(frozen=True)
class ParseLimits:
    max_bytes: int
    max_pages: int
    max_chars: int
    timeout_s: float
    memory_bytes: int


class SandboxedParser:
    """Parses documents in a child process within :class:`ParseLimits`.

    Args:
        limits: what one document may take.
        command: the child's command line; the default runs this module. Tests pass
            another that wraps the same worker around a misbehaving parse function.
    """

    def __init__(self, limits: ParseLimits, command: Sequence[str] = WORKER) -> None:
        self.limits = limits
        self.command = tuple(command)

    def __call__(self, content: bytes, content_type: str, title: str | None) -> ParsedDocument:
        """The parsed document (blocking; call it from a thread).

        Raises:
            ParseError: the document was refused (its subclass says why), or
                :class:`ParserKilled` when the parser did not finish within the limits.
        """
        limits = self.limits
        header = {
            "content_type": content_type,
            "title": title,
            "max_bytes": limits.max_bytes,
            "max_pages": limits.max_pages,
            "max_chars": limits.max_chars,
            "memory_bytes": limits.memory_bytes,
            "cpu_s": max(1, int(limits.timeout_s) + 1),
        }
        payload = json.dumps(header).encode() + b"\n" + content
        try:
            done = subprocess.run(
                self.command,
                input=payload,
                capture_output=True,
                timeout=limits.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:  # run() has killed the child
            raise ParserKilled(
                f"the parser did not finish within {limits.timeout_s:g} s and was stopped"
            ) from None
        return _outcome(done, limits)


def _outcome(done: subprocess.CompletedProcess[bytes], limits: ParseLimits) -> ParsedDocument:
    memory = f"{limits.memory_bytes // 2**20} MiB"
    if done.returncode == _OUT_OF_MEMORY:
        raise ParserKilled(f"the parser ran out of memory (limit {memory})")
    if done.returncode == -signal.SIGXCPU:
        raise ParserKilled(f"the parser used up its CPU time ({limits.timeout_s:g} s)")
    if done.returncode == -signal.SIGKILL:
        raise ParserKilled(f"the parser was killed (its limits: {memory}, {limits.timeout_s:g} s)")
    if done.returncode != 0:
        detail = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        raise ParserKilled(f"the parser crashed ({detail}; memory limit {memory})")
    try:
        reply = json.loads(done.stdout)
    except ValueError:
        raise ParserKilled("the parser gave no readable answer") from None
    if "error" in reply:
        kinds = _parse_errors()
        raise kinds.get(reply["error"]["kind"], ParseError)(str(reply["error"]["message"]))
    found = reply["document"]
    return ParsedDocument(found["text"], found["title"], found["content_type"])


def _parse_errors() -> dict[str, type[ParseError]]:
    found: dict[str, type[ParseError]] = {"ParseError": ParseError}
    pending = list(ParseError.__subclasses__())
    while pending:
        kind = pending.pop()
        found[kind.__name__] = kind
        pending.extend(kind.__subclasses__())
    return found


# --------------------------------------------------------------------------- the child


def limit_self(memory_bytes: int, cpu_s: int) -> None:
    """Cap this process's address space and CPU time (the child calls it first)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))


def worker(parse: Any = None) -> None:
    """The child's main: read the header and the document from stdin, answer on stdout.

    Args:
        parse: the parse function (tests wrap the real one); the default is
            :func:`~services.retrieval.parsing.parse_document`.
    """
    if parse is None:
        from services.retrieval.parsing import parse_document as parse
    # imports first, so that the limits measure the document rather than the libraries
    import markdown_it  # noqa: F401
    import pypdf  # noqa: F401
    import selectolax.lexbor  # noqa: F401

    stdin = sys.stdin.buffer
    header = json.loads(stdin.readline())
    limit_self(int(header["memory_bytes"]), int(header["cpu_s"]))
    try:
        content = stdin.read()
        parsed = parse(
            content,
            header["content_type"],
            header["title"],
            max_bytes=int(header["max_bytes"]),
            max_pages=int(header["max_pages"]),
            max_chars=int(header["max_chars"]),
        )
        answer: dict[str, Any] = {
            "document": {
                "text": parsed.text,
                "title": parsed.title,
                "content_type": parsed.content_type,
            }
        }
    except MemoryError:
        sys.exit(_OUT_OF_MEMORY)
    except ParseError as error:
        answer = {"error": {"kind": type(error).__name__, "message": str(error)}}
    sys.stdout.write(json.dumps(answer))


if __name__ == "__main__":
    worker()
