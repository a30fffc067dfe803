"""child_output.OutputPipe with real child processes: every line arrives, in order, in batches rather than
one wakeup a line, and a child's last words are read when it exits."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import sys
import time

from llmfleet_agent.child_output import DELAY, MAX_LINE, PIPE_SIZE, OutputPipe


async def run_child(code: str, pipe: OutputPipe) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=pipe.write_fd, stderr=asyncio.subprocess.DEVNULL
    )
    pipe.start()
    return await proc.wait()


def test_lines_in_order_and_the_last_words_at_exit() -> None:
    lines: list[bytes] = []

    async def main() -> None:
        pipe = OutputPipe(lines.append)
        code = "import sys\nfor i in range(500): print(f'line {i}', flush=True)\nprint('last words', end='')"
        assert await run_child(code, pipe) == 0
        pipe.drain()  # as the supervisor does once the child has exited: no wait for the next batch
        assert lines[-1] == b"last words"  # a last line without its newline is not lost
        pipe.close()
        pipe.close()  # idempotent

    asyncio.run(main())
    assert lines == [f"line {i}".encode() for i in range(500)] + [b"last words"]


def test_a_steady_writer_costs_a_few_reads_a_second_not_one_a_line() -> None:
    """200 lines over about half a second: read in batches at most DELAY apart, not line by line."""
    batches: list[tuple[float, int]] = []  # (when, lines so far)
    count = 0

    def on_line(_: bytes) -> None:
        nonlocal count
        count += 1
        now = time.monotonic()
        if not batches or now - batches[-1][0] > DELAY / 4:  # a new read, not a line of the same one
            batches.append((now, count))

    async def main() -> float:
        pipe = OutputPipe(on_line)
        code = "import time\nfor i in range(200):\n    print(i, flush=True); time.sleep(0.0025)"
        started = time.monotonic()
        assert await run_child(code, pipe) == 0
        took = time.monotonic() - started
        pipe.close()
        return took

    took = asyncio.run(main())
    assert count == 200
    # a line each read would be 200 reads; in batches, one each DELAY of the writer's life, plus the last
    assert len(batches) <= took / DELAY + 2, (len(batches), took)


def test_a_line_without_an_end_is_passed_on_in_pieces() -> None:
    pieces: list[bytes] = []

    async def main() -> None:
        pipe = OutputPipe(pieces.append)
        code = f"import sys; sys.stdout.write('x' * {3 * MAX_LINE + 5}); sys.stdout.flush()"
        assert await run_child(code, pipe) == 0
        pipe.close()

    asyncio.run(main())
    assert [len(p) for p in pieces] == [MAX_LINE, MAX_LINE, MAX_LINE, 5]


def test_the_pipe_is_enlarged_where_the_system_allows() -> None:
    pipe = OutputPipe(lambda _: None)
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            cap = int(f.read())
        size = fcntl.fcntl(pipe.read_fd, fcntl.F_GETPIPE_SZ)
        assert size == PIPE_SIZE if cap >= PIPE_SIZE else size >= 65536
    finally:
        pipe.close()


def test_a_child_writing_faster_than_the_agent_logs_never_holds_the_loop() -> None:
    """`yes` writes far faster than lines are logged: the loop still turns, a batch at a time, and every
    line the child wrote arrives."""
    text = b"y" * 40
    lines = 0
    other: list[bytes] = []

    def on_line(line: bytes) -> None:  # about what logging a line costs
        nonlocal lines
        json.dumps({"msg": line.decode(), "stream": "stderr", "n": lines})
        if line == text:
            lines += 1
        else:
            other.append(line)

    async def main() -> float:
        pipe = OutputPipe(on_line)
        proc = await asyncio.create_subprocess_exec(
            "timeout", "2.5", "yes", text.decode(), stdout=pipe.write_fd, stderr=asyncio.subprocess.DEVNULL
        )
        pipe.start()
        loop = asyncio.get_running_loop()
        longest, last = 0.0, loop.time()
        while proc.returncode is None:
            await asyncio.sleep(0.01)
            now = loop.time()
            longest, last = max(longest, now - last), now
        pipe.close()
        return longest

    longest = asyncio.run(main())
    assert longest < 1.0, f"the event loop was held {longest:.2f} s"
    # every line whole, but the one `yes` was writing when `timeout` stopped it
    assert lines > 0 and len(other) <= 1 and text.startswith(b"".join(other))


def test_the_last_words_pass_while_a_grandchild_holds_the_pipe() -> None:
    """The child exits with a last line without its end; a grandchild it left still holds the pipe, so the
    pipe does not end: the exit's drain passes the line on all the same."""
    lines: list[bytes] = []

    async def main() -> None:
        pipe = OutputPipe(lines.append)
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", "sleep 30 & printf 'fatal: why'", stdout=pipe.write_fd, start_new_session=True
        )
        pipe.start()
        try:
            await proc.wait()
            pipe.drain(final=True)
            assert lines == [b"fatal: why"]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            pipe.close()

    asyncio.run(main())


def test_a_line_that_fails_to_be_logged_does_not_stop_the_reading() -> None:
    lines: list[bytes] = []

    def on_line(line: bytes) -> None:
        if line == b"boom":
            raise RuntimeError("a handler failed")
        lines.append(line)

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)  # it is expected
        pipe = OutputPipe(on_line)
        code = "import time\nprint('boom', flush=True)\ntime.sleep(0.3)\nprint('after', flush=True)\n"
        code += "time.sleep(9)"
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=pipe.write_fd)
        pipe.start()
        try:
            deadline = time.monotonic() + 5
            while b"after" not in lines:  # read by the batches, not by close()
                assert time.monotonic() < deadline, "nothing read after the failed line"
                await asyncio.sleep(0.02)
        finally:
            proc.kill()
            await proc.wait()
            pipe.close()

    asyncio.run(main())
