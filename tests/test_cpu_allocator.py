"""The budgeted CPU pool allocator (cpu_allocator.py): which blocks it serves and reuses, its budget, the raw
interface, fork safety, the fallback without a compiler, and that training computes the same values with it."""
import logging
import os
import sys
import threading
import time

import pytest
import torch

import cpu_allocator

MiB = 1 << 20
MARGIN_MB = 16
PAGE = 4096


@pytest.fixture
def pool():
    """The pool as torch's CPU allocator for one test, with a small margin. Skips only where this machine has no
    C++ compiler at all (then training falls back to the system allocator, see the fallback test)."""
    if os.name != "posix" or cpu_allocator.find_compiler() is None:
        pytest.skip("no C++ compiler: the pool cannot be built here")
    before = cpu_allocator.stats()
    assert before is None or not before.active, "a pool was left installed by an earlier test"
    with cpu_allocator.cpu_pool(True, margin_mb=MARGIN_MB) as used:
        assert used, "the pool did not install (its warning says why)"
        yield cpu_allocator
    assert not cpu_allocator.stats().active


def _rounded(nbytes: int) -> int:
    return -(-nbytes // cpu_allocator.ROUND_BYTES) * cpu_allocator.ROUND_BYTES


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_large_blocks_are_pooled_and_reused_small_ones_are_not(pool):
    start = pool.stats()
    nbytes = 3 * MiB + 1
    a = torch.empty(nbytes, dtype=torch.uint8)
    address = a.data_ptr()
    assert address % PAGE == 0  # its own mapping
    after_alloc = pool.stats()
    assert after_alloc.live_bytes - start.live_bytes == _rounded(nbytes) == 3 * MiB + cpu_allocator.ROUND_BYTES
    assert after_alloc.misses == start.misses + 1
    del a
    after_free = pool.stats()
    assert after_free.live_bytes == start.live_bytes
    assert after_free.cached_bytes - start.cached_bytes == _rounded(nbytes)
    # A request of the same rounded size gets the same block back; its bytes are usable as any others.
    b = torch.empty(3 * MiB + 100, dtype=torch.uint8)
    assert b.data_ptr() == address
    assert pool.stats().hits == start.hits + 1
    b.fill_(7)
    assert int(b.sum()) == 7 * b.numel()
    small = torch.empty(1000)  # below MIN_POOLED_BYTES: the previous allocator's
    assert pool.stats().live_bytes == after_alloc.live_bytes
    del b, small
    assert pool.stats().live_bytes == start.live_bytes


def test_near_sizes_share_a_block_and_a_miss_grows_a_smaller_one(pool):
    block = 3 * MiB + cpu_allocator.ROUND_BYTES
    a = torch.empty(block, dtype=torch.uint8)
    address = a.data_ptr()
    del a
    start = pool.stats()
    # Within FIT_SLACK_PER_1024 of the request: the cached block serves it, and counts whole.
    smaller = block - block * cpu_allocator.FIT_SLACK_PER_1024 // 1024 // 2
    b = torch.empty(smaller, dtype=torch.uint8)
    assert b.data_ptr() == address
    s = pool.stats()
    assert (s.hits, s.live_bytes - start.live_bytes, s.cached_bytes) == (start.hits + 1, block,
                                                                          start.cached_bytes - block)
    del b
    # A larger request misses; on Linux the cached block is grown to it (mremap) instead of a new mapping
    # being made beside it, so nothing is left in the cache.
    c = torch.ones(5 * MiB, dtype=torch.uint8)
    s = pool.stats()
    assert s.misses == start.misses + 1 and s.live_bytes - start.live_bytes == 5 * MiB
    if sys.platform.startswith("linux"):
        assert s.cached_bytes == start.cached_bytes - block
    assert int(c.sum()) == 5 * MiB


def test_live_plus_cached_stays_within_the_peak_plus_the_margin(pool):
    """Freed blocks of one size are unmapped, oldest first, as blocks of another size push live + cached past
    the largest live total + the margin; the process's resident set follows."""
    margin = MARGIN_MB * MiB
    base = pool.stats()
    base_rss = _resident_bytes() if sys.platform.startswith("linux") else None

    def check():
        s = pool.stats()
        assert s.live_bytes + s.cached_bytes <= s.peak_live_bytes + margin + base.cached_bytes, s
        return s

    first = [torch.ones(5 * MiB, dtype=torch.uint8) for _ in range(20)]  # 100 MiB, touched
    peak_first = check().peak_live_bytes
    del first
    assert check().cached_bytes >= 100 * MiB - margin  # kept for reuse, within the budget
    second = []
    for _ in range(20):  # 140 MiB of another size: every request misses the cache
        second.append(torch.ones(7 * MiB, dtype=torch.uint8))
        check()
    s = check()
    assert s.peak_live_bytes >= peak_first + 40 * MiB
    assert s.cached_bytes <= margin + base.cached_bytes  # the 5 MiB blocks are gone, bar the margin
    if base_rss is not None:
        # Without the budget the 100 MiB of cached blocks would still be resident beside the 140 MiB.
        assert _resident_bytes() - base_rss < (140 + MARGIN_MB + 40) * MiB
    del second
    s = check()
    assert s.cached_bytes > 100 * MiB  # the 7 MiB blocks, kept for the next step
    # restart_budget (speed.py calls it after the warm-up): the budget counts from the bytes live now.
    pool.restart_budget()
    s = pool.stats()
    assert s.peak_live_bytes == s.live_bytes
    assert s.cached_bytes <= margin + base.cached_bytes


def test_raw_interface_frees_pooled_and_small_blocks(pool):
    """oneDNN takes scratch buffers through allocate/free calls without a DataPtr: both sizes go back right."""
    lib = pool._load()
    start = pool.stats()
    big = lib.dv_raw_allocate(2 * MiB)
    assert pool.stats().live_bytes == start.live_bytes + 2 * MiB
    small = lib.dv_raw_allocate(256)
    assert pool.stats().live_bytes == start.live_bytes + 2 * MiB
    lib.dv_raw_deallocate(small)
    lib.dv_raw_deallocate(big)
    end = pool.stats()
    assert end.live_bytes == start.live_bytes
    assert end.cached_bytes == start.cached_bytes + 2 * MiB


def test_3d_convolutions_give_the_same_values_and_free_everything(pool):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(16, 16, 3, padding=1).to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 16, 32, 32, 32)  # 2 MiB: pooled.to(memory_format=torch.channels_last_3d)

    def run():
        inp = x.clone().requires_grad_()
        out = conv(inp)
        out.square().sum().backward()
        grads = (out.detach().clone(), inp.grad.clone(), conv.weight.grad.clone())
        conv.weight.grad = conv.bias.grad = None
        return grads

    live_before = pool.stats().live_bytes
    pooled = run()
    assert pool.stats().live_bytes - live_before == sum(_rounded(t.numel() * t.element_size())
                                                         for t in pooled if t.numel() * t.element_size() >= MiB)
    pool.uninstall()
    try:
        plain = run()
    finally:
        assert pool.install(MARGIN_MB)
    for a, b in zip(pooled, plain):
        assert torch.equal(a, b)


def _child_allocates(timeout_s: float = 10.0) -> bool:
    """Fork; the child allocates and frees a pooled block and exits. True if it finished in time (else it is
    killed)."""
    pid = os.fork()
    if pid == 0:
        try:
            torch.empty(3 * MiB, dtype=torch.uint8)  # allocated and freed at once
        finally:
            os._exit(0)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.005)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return False


# Python 3.12+ warns about any fork of a threaded process; forking one is what this test is about.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_while_another_thread_holds_the_lock_does_not_deadlock(pool):
    """A data-loader worker forked while another thread is inside the allocator: the fork handlers wait for the
    lock and release it on both sides, so the child's first pooled allocation does not wait forever."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    lib = pool._load()
    holder = threading.Thread(target=lib.dv_pool_hold_lock, args=(300_000,))  # ctypes drops the GIL
    holder.start()
    time.sleep(0.1)  # the holder is inside its 0.3 s
    try:
        assert _child_allocates(), "the forked child hung on the pool's lock"
    finally:
        holder.join()

    # And under churn from a thread allocating through torch.
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            torch.empty(2 * MiB, dtype=torch.uint8)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        assert all(_child_allocates() for _ in range(10))
    finally:
        stop.set()
        thread.join()


def test_auto_uses_the_pool_on_cpu_from_512_px():
    assert cpu_allocator.wanted("auto", "cpu", 512) and cpu_allocator.wanted("auto", "cpu", 1024)
    assert not cpu_allocator.wanted("auto", "cpu", 256)
    assert cpu_allocator.wanted("pool", "cpu", 128)
    assert not cpu_allocator.wanted("system", "cpu", 512)
    assert not cpu_allocator.wanted("pool", "cuda", 512) and not cpu_allocator.wanted("auto", "mps", 512)
    with pytest.raises(ValueError, match="cpu_allocator"):
        cpu_allocator.wanted("jemalloc", "cpu", 512)


def test_without_a_compiler_the_run_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_allocator, "_library", None)
    monkeypatch.setattr(cpu_allocator, "_unavailable", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(cpu_allocator.ENV_CACHE, str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="cpu_allocator"):
        with cpu_allocator.cpu_pool(True) as used:
            assert not used
            x = torch.ones(2 * MiB, dtype=torch.uint8)  # the system allocator still serves
            assert int(x.sum()) == 2 * MiB
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "no-such-compiler" in message and "system allocator" in message and "\n" not in message
    assert cpu_allocator.stats() is None  # nothing was loaded


def test_a_failing_compile_is_reported_in_one_line(tmp_path):
    if os.name != "posix":
        pytest.skip("posix only")
    failing = tmp_path / "cxx"
    failing.write_text("#!/bin/sh\necho 'cpu_pool.cpp:1:1: error: simulated' >&2\nexit 1\n")
    failing.chmod(0o755)
    with pytest.raises(cpu_allocator.PoolUnavailable, match=r"failed: .*error: simulated"):
        cpu_allocator.build_library(str(tmp_path / "cache"), str(failing))
    assert not any(name.endswith(".so") for name in os.listdir(tmp_path / "cache"))
