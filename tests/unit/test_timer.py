"""edgemml's one timer (runtimes.time_calls): interleaved rounds, each block after a pause that lets
the previous runtime's threads go idle, then one untimed call, then the timed calls."""

from __future__ import annotations

import time

from edgemml.runtimes import time_calls


def test_blocks_start_after_a_pause_and_one_untimed_call():
    log: list[tuple[str, float, float]] = []

    def call(name: str):
        def fn() -> None:
            t0 = time.perf_counter()
            time.sleep(0.001)
            log.append((name, t0, time.perf_counter()))
        return fn

    settle = 0.03
    timed = time_calls({"a": call("a"), "b": call("b")}, warmup=2, runs=6, rounds=3,
                       settle_s=settle)
    assert timed["a"].runs == timed["b"].runs == 6
    # per name: 2 warm-up calls, then per round one untimed call and 2 timed ones
    assert [n for n, *_ in log].count("a") == 2 + 3 * (1 + 2)
    pauses = [i for i in range(1, len(log)) if log[i][1] - log[i - 1][2] >= settle * 0.9]
    switches = [i for i in range(1, len(log)) if log[i][0] != log[i - 1][0]]
    assert set(switches) <= set(pauses)          # no call starts in another's wake
    assert len(pauses) == 1 + 2 * 3              # before b's warm-up, and before every block
    blocks = [log[i:j] for i, j in zip(pauses[1:], [*pauses[2:], len(log)])]
    assert [len(b) for b in blocks] == [3] * 6   # one untimed + two timed calls each
