"""A budgeted caching allocator for CPU tensors, used by CPU runs at 512 px and up (``--cpu_allocator auto``).

Why: a training step at 512 px allocates ~20 GiB in blocks of 1 MiB and up, in hundreds of sizes. glibc
either keeps freed heap blocks resident for reuse, and the gaps between them add 0.5-0.8 GB to the peak
resident set, or it returns each large block to the kernel, which must zero-fill it again on the next use
(a page fault per 4 KiB; 1.8 M per step). README, Performance -> Memory, has the measurements.

The rules:
* requests of ``MIN_POOLED_BYTES`` and up are rounded up to ``ROUND_BYTES`` and served from their own
  anonymous mappings; smaller ones go to the allocator that was installed before (glibc's malloc);
* a freed block is kept for reuse by a later request of its size or up to ``FIT_SLACK_PER_1024`` / 1024
  smaller; a request no cached block fits grows the largest smaller one in place (Linux ``mremap``: its
  resident pages are kept, only the rest is faulted in), or else gets a new mapping;
* live + cached bytes never exceed the largest live total seen since ``install`` plus a margin
  (``DEFAULT_MARGIN_MB``): past that, the blocks freed longest ago are unmapped first.
The peak resident set is then about the peak of the live tensors plus the margin, and away from the peak most
large requests are reused without page faults. Values are unchanged: it only decides where bytes live.

The allocator is ~290 lines of C++ against c10's headers, compiled on first use with the system C++ compiler
(about 1 s) into ``$DEEPVOXELS_CACHE`` (default ``~/.cache/deepvoxels``), one file per source, torch version
and compiler, and loaded with ctypes. Where that is impossible (no compiler, not Linux or macOS) the run
goes on with the system allocator after a one-line warning.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterator, NamedTuple, Optional

log = logging.getLogger(__name__)

MIN_POOLED_BYTES = 1 << 20  # smaller blocks: glibc's size classes already reuse them well
ROUND_BYTES = 1 << 16  # pooled sizes are rounded up to this, so near-equal requests share blocks
# Cache allowed above the peak live total. 64 MB measured 11.78 s / 4633 MB per step at 512 px, 128 MB
# 11.51 / 4691 and 256 MB 11.54 / 4822, against glibc's 12.23 / 5164 in the same sitting (README).
DEFAULT_MARGIN_MB = 64
# A cached block up to this many 1024ths larger than a request serves it (the excess counts as live). At
# 128 px, where a pass holds only ~120 MB, exact sizes alone missed 796 of 4013 requests, and page faults
# made test rendering ~20% slower than with glibc; with this slack and cached blocks grown in place (mremap)
# the pool faults about as often as glibc there.
FIT_SLACK_PER_1024 = 128
# ``--cpu_allocator auto`` (the default) uses the pool from this image size up. At 512 px it is faster and
# smaller (training 10.8-11.1 s / 4.64 GB against glibc's 11.8-12.0 s / 5.21-5.26 GB, test 1.08 against
# 1.23 s per view); at 128 px test rendering was 10-30% slower with it (0.062 / 0.083 against 0.055 / 0.062 s
# per view, same sittings), and at 256 px training was no faster.
AUTO_MIN_SIDELENGTH = 512
COMPILE_TIMEOUT_S = 300
ENV_CACHE = "DEEPVOXELS_CACHE"

_CPP_SOURCE = r"""
// Budgeted caching CPU allocator (see cpu_allocator.py for the rules). Plain C entry points for ctypes.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <pthread.h>
#include <sys/mman.h>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <list>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

struct Block { size_t size; void* ptr; };

class BudgetPool final : public c10::Allocator {
 public:
  explicit BudgetPool(c10::Allocator* previous) : previous_(previous) {}

  void configure(size_t min_bytes, size_t round_bytes, size_t margin, size_t slack_per_1024) {
    std::lock_guard<std::mutex> lock(mutex_);
    min_bytes_ = min_bytes;
    round_bytes_ = round_bytes;
    margin_ = margin;
    slack_per_1024_ = slack_per_1024;
    peak_live_ = live_;  // a new budget per install
    active_ = true;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes_) return previous_->allocate(n);
    size_t size = (n + round_bytes_ - 1) / round_bytes_ * round_bytes_;
    void* ptr = nullptr;
    Block grow{0, nullptr};
    std::vector<Block> unmap;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest cached block that fits, if it is at most slack_per_1024 / 1024 larger.
      auto hit = free_.lower_bound(size);
      if (hit != free_.end() && hit->first - size <= size / 1024 * slack_per_1024_) {
        size = hit->first;
        ptr = hit->second;
        free_.erase(hit);
        order_.erase(position_.at(ptr));
        position_.erase(ptr);
        cached_ -= size;
        ++hits_;
        sizes_[ptr] = size;
      } else {
        ++misses_;
#ifdef __linux__
        if (hit != free_.begin()) {
          // Grow the largest cached block below the size: its resident pages move to the new block, only
          // the rest is faulted in (a new mapping would fault in all of it, and the budget might then unmap
          // that cached block anyway).
          auto below = std::prev(hit);
          grow = {below->first, below->second};
          free_.erase(below);
          order_.erase(position_.at(grow.ptr));
          position_.erase(grow.ptr);
          cached_ -= grow.size;
        }
#endif
      }
      live_ += size;
      shrink_locked(&unmap);
    }
    release(unmap);
#ifdef __linux__
    if (ptr == nullptr && grow.ptr != nullptr) {
      void* moved = mremap(grow.ptr, grow.size, size, MREMAP_MAYMOVE);
      if (moved == MAP_FAILED) {
        munmap(grow.ptr, grow.size);
      } else {
        ptr = moved;
        std::lock_guard<std::mutex> lock(mutex_);
        sizes_[ptr] = size;
      }
    }
#endif
    if (ptr == nullptr) ptr = map_new(size);
    report(ptr, static_cast<int64_t>(size));
    return {ptr, ptr, &BudgetPool::deallocate, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BudgetPool::deallocate; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  void give_back(void* ptr) {
    std::vector<Block> unmap;
    size_t size = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto known = sizes_.find(ptr);
      if (known != sizes_.end()) {
        size = known->second;
        sizes_.erase(known);
        live_ -= size;
        if (active_) {
          order_.push_back({size, ptr});
          position_[ptr] = std::prev(order_.end());
          free_.emplace(size, ptr);
          cached_ += size;
          shrink_locked(&unmap);
        } else {
          unmap.push_back({size, ptr});
        }
      }
    }
    if (size == 0) {  // a small block of the previous allocator, freed through the raw interface
      previous_->raw_deleter()(ptr);
      return;
    }
    report(ptr, -static_cast<int64_t>(size));
    release(unmap);
  }

  // Start the budget again from the bytes live now, unmapping the cache down to the margin.
  void restart_budget() {
    std::vector<Block> unmap;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      peak_live_ = live_;
      shrink_locked(&unmap);
    }
    release(unmap);
  }

  // Stop caching and unmap what is cached; blocks still live are unmapped when they are freed.
  void deactivate() {
    std::vector<Block> unmap;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      active_ = false;
      drop_cache_locked(&unmap);
    }
    release(unmap);
  }

  void stats(int64_t* out) {
    std::lock_guard<std::mutex> lock(mutex_);
    out[0] = static_cast<int64_t>(live_);
    out[1] = static_cast<int64_t>(cached_);
    out[2] = static_cast<int64_t>(peak_live_);
    out[3] = static_cast<int64_t>(hits_);
    out[4] = static_cast<int64_t>(misses_);
    out[5] = active_ ? 1 : 0;
  }

  c10::Allocator* previous() const { return previous_; }
  std::mutex& mutex() { return mutex_; }

  static void deallocate(void* ptr);

 private:
  void* map_new(size_t size) {
    void* ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ptr == MAP_FAILED) {  // give the cache back and try once more
      std::vector<Block> unmap;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        drop_cache_locked(&unmap);
      }
      release(unmap);
      ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    std::lock_guard<std::mutex> lock(mutex_);
    if (ptr == MAP_FAILED) {
      live_ -= size;
      TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU pool allocator (cpu_allocator.py): cannot map ",
                       size, " bytes (", live_, " bytes live)");
    }
    sizes_[ptr] = size;
    return ptr;
  }

  // Keep live + cached within the largest live total seen plus the margin; unmap the oldest first.
  void shrink_locked(std::vector<Block>* unmap) {
    if (live_ > peak_live_) peak_live_ = live_;
    const size_t allowed = peak_live_ + margin_ - live_;
    while (cached_ > allowed && !order_.empty()) pop_oldest_locked(unmap);
  }

  void drop_cache_locked(std::vector<Block>* unmap) {
    while (!order_.empty()) pop_oldest_locked(unmap);
  }

  void pop_oldest_locked(std::vector<Block>* unmap) {
    const Block oldest = order_.front();
    order_.pop_front();
    position_.erase(oldest.ptr);
    auto same = free_.equal_range(oldest.size);
    for (auto it = same.first; it != same.second; ++it) {
      if (it->second == oldest.ptr) {
        free_.erase(it);
        break;
      }
    }
    cached_ -= oldest.size;
    unmap->push_back(oldest);
  }

  void report(void* ptr, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    size_t live, cached;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live = live_;
      cached = cached_;
    }
    c10::reportMemoryUsageToProfiler(ptr, delta, live, live + cached, c10::Device(c10::DeviceType::CPU));
  }

  static void release(const std::vector<Block>& blocks) {
    for (const Block& b : blocks) munmap(b.ptr, b.size);
  }

  c10::Allocator* const previous_;
  size_t min_bytes_ = SIZE_MAX, round_bytes_ = 1, margin_ = 0, slack_per_1024_ = 0;
  bool active_ = false;
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // cached blocks by size
  std::list<Block> order_;  // cached blocks, least recently freed first
  std::unordered_map<void*, std::list<Block>::iterator> position_;
  std::unordered_map<void*, size_t> sizes_;  // blocks handed out, by address
  size_t live_ = 0, cached_ = 0, peak_live_ = 0, hits_ = 0, misses_ = 0;
};

// c10's CPU allocator slot keeps the allocator of the highest priority set so far: the pool outranks the
// default (0), and the previous allocator is restored with the same priority.
constexpr uint8_t kPriority = 100;

BudgetPool* pool = nullptr;  // created once, never destroyed: freed tensors may outlive any install

void BudgetPool::deallocate(void* ptr) { pool->give_back(ptr); }

// A fork while another thread holds the lock would leave the child's copy locked forever.
void lock_before_fork() { pool->mutex().lock(); }
void unlock_after_fork() { pool->mutex().unlock(); }

}  // namespace

extern "C" {

int dv_pool_install(uint64_t min_bytes, uint64_t round_bytes, uint64_t margin_bytes, uint64_t slack_per_1024) {
  if (pool == nullptr) {
    pool = new BudgetPool(c10::GetCPUAllocator());
    if (pthread_atfork(lock_before_fork, unlock_after_fork, unlock_after_fork) != 0) return 0;
  }
  pool->configure(min_bytes, round_bytes, margin_bytes, slack_per_1024);
  c10::SetCPUAllocator(pool, kPriority);
  return c10::GetCPUAllocator() == pool ? 1 : 0;
}

void dv_pool_restart_budget() {
  if (pool != nullptr) pool->restart_budget();
}

void dv_pool_uninstall() {
  if (pool == nullptr) return;
  if (c10::GetCPUAllocator() == pool) c10::SetCPUAllocator(pool->previous(), kPriority);
  pool->deactivate();
}

void dv_pool_stats(int64_t* out) {
  if (pool == nullptr) {
    for (int i = 0; i < 6; ++i) out[i] = 0;
    return;
  }
  pool->stats(out);
}

// For the tests: hold the pool's lock for a while, as a thread inside allocate() would at a fork.
void dv_pool_hold_lock(uint64_t microseconds) {
  if (pool == nullptr) return;
  std::lock_guard<std::mutex> lock(pool->mutex());
  std::this_thread::sleep_for(std::chrono::microseconds(microseconds));
}

// The raw interface (oneDNN's scratch buffers use it), for the tests.
void* dv_raw_allocate(uint64_t n) { return c10::GetCPUAllocator()->raw_allocate(n); }
void dv_raw_deallocate(void* ptr) { c10::GetCPUAllocator()->raw_deallocate(ptr); }

}  // extern "C"
"""
_NUM_STATS = 6


class PoolStats(NamedTuple):
    """The pool's counters (bytes are rounded block sizes)."""
    live_bytes: int  # handed out and not yet freed
    cached_bytes: int  # freed, kept mapped for reuse
    peak_live_bytes: int  # largest live total since install: the budget is this plus the margin
    hits: int  # requests served from the cache
    misses: int  # requests that mapped a new block
    active: bool  # installed as torch's CPU allocator


class PoolUnavailable(RuntimeError):
    """The allocator cannot be built or loaded here; the message says why in one line."""


_library: Optional[ctypes.CDLL] = None
_unavailable: Optional[str] = None  # why loading failed, once it has


def wanted(choice: str, device_type: str, img_sidelength: int) -> bool:
    """Whether a run should use the pool: ``--cpu_allocator`` ``pool``, ``system`` or ``auto`` (the pool on CPU
    from ``AUTO_MIN_SIDELENGTH`` px up). GPU runs keep the system allocator for their few CPU tensors."""
    if choice not in ("auto", "pool", "system"):
        raise ValueError(f"--cpu_allocator {choice!r}: expected auto, pool or system")
    if device_type != "cpu" or choice == "system":
        return False
    return choice == "pool" or img_sidelength >= AUTO_MIN_SIDELENGTH


def cache_dir() -> str:
    """Folder for the compiled allocator: ``$DEEPVOXELS_CACHE`` or ``~/.cache/deepvoxels``."""
    return os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "deepvoxels")


def find_compiler() -> Optional[str]:
    """``$CXX``, else the first of c++, g++, clang++ on PATH."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _compile_command(compiler: str, source: str, target: str) -> list[str]:
    import torch
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    lib_dir = os.path.join(torch_dir, "lib")
    return [compiler, "-O2", "-std=c++20", "-shared", "-fPIC",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
            "-isystem", os.path.join(torch_dir, "include"), source, "-o", target,
            "-L", lib_dir, "-lc10", f"-Wl,-rpath,{lib_dir}"]


def build_library(folder: Optional[str] = None, compiler: Optional[str] = None) -> str:
    """Compile the allocator into ``folder`` (default ``cache_dir()``) unless that file exists; returns its
    path. The name hashes the source, torch's version and the compile command, so a change rebuilds. Raises
    PoolUnavailable with a one-line reason."""
    import torch
    if os.name != "posix":
        raise PoolUnavailable(f"needs mmap (Linux or macOS), not {sys.platform}")
    compiler = compiler or find_compiler()
    if compiler is None:
        raise PoolUnavailable("no C++ compiler (set CXX, or install g++ or clang++)")
    folder = folder or cache_dir()
    key = hashlib.sha256("\n".join([_CPP_SOURCE, torch.__version__, os.path.abspath(torch.__file__),
                                    " ".join(_compile_command(compiler, "SRC", "OUT"))]).encode()).hexdigest()
    target = os.path.join(folder, f"cpu_pool_{key[:16]}.so")
    if os.path.isfile(target):
        return target
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise PoolUnavailable(f"cannot create {folder} ({err.strerror}); set {ENV_CACHE}") from None
    start = time.perf_counter()
    # Built under a temporary name and renamed: a concurrent or interrupted build never leaves half a file.
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        source, partial = os.path.join(tmp, "cpu_pool.cpp"), os.path.join(tmp, "cpu_pool.so")
        with open(source, "w") as handle:
            handle.write(_CPP_SOURCE)
        try:
            proc = subprocess.run(_compile_command(compiler, source, partial), capture_output=True, text=True,
                                  timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise PoolUnavailable(f"cannot run the C++ compiler {compiler}: {err}") from None
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if "error" in line] or proc.stderr.splitlines()
            first = errors[0].strip() if errors else f"exit status {proc.returncode}"
            raise PoolUnavailable(f"{compiler} failed: {first[:300]}")
        os.replace(partial, target)
    log.info("built the CPU pool allocator in %.1f s: %s", time.perf_counter() - start, target)
    return target


def _load() -> ctypes.CDLL:
    """The loaded library, built on first use; raises PoolUnavailable (and remembers why)."""
    global _library, _unavailable
    if _library is not None:
        return _library
    if _unavailable is not None:
        raise PoolUnavailable(_unavailable)
    try:
        path = build_library()
        try:
            lib = ctypes.CDLL(path)
        except OSError as err:
            raise PoolUnavailable(f"cannot load {path}: {err}") from None
    except PoolUnavailable as err:
        _unavailable = str(err)
        raise
    lib.dv_pool_install.argtypes = [ctypes.c_uint64] * 4
    lib.dv_pool_install.restype = ctypes.c_int
    lib.dv_pool_uninstall.argtypes = []
    lib.dv_pool_uninstall.restype = None
    lib.dv_pool_restart_budget.argtypes = []
    lib.dv_pool_restart_budget.restype = None
    lib.dv_pool_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    lib.dv_pool_stats.restype = None
    lib.dv_pool_hold_lock.argtypes = [ctypes.c_uint64]
    lib.dv_pool_hold_lock.restype = None
    lib.dv_raw_allocate.argtypes = [ctypes.c_uint64]
    lib.dv_raw_allocate.restype = ctypes.c_void_p
    lib.dv_raw_deallocate.argtypes = [ctypes.c_void_p]
    lib.dv_raw_deallocate.restype = None
    _library = lib
    return lib


def install(margin_mb: int = DEFAULT_MARGIN_MB) -> bool:
    """Make the pool torch's CPU allocator, with a fresh budget (peak live so far + ``margin_mb``). Returns
    False, after one warning line that says why, where it cannot be built or installed."""
    try:
        lib = _load()
    except PoolUnavailable as err:
        log.warning("--cpu_allocator pool: %s; using the system allocator (at 512 px ~0.6 GB more peak memory)",
                    err)
        return False
    if not lib.dv_pool_install(MIN_POOLED_BYTES, ROUND_BYTES, int(margin_mb) << 20, FIT_SLACK_PER_1024):
        lib.dv_pool_uninstall()
        log.warning("--cpu_allocator pool: torch kept another CPU allocator; using that one")
        return False
    return True


def uninstall() -> None:
    """Give torch back the allocator it had before ``install`` and unmap the cache. Tensors still alive are
    unmapped when freed. A no-op when the pool was never loaded."""
    if _library is not None:
        _library.dv_pool_uninstall()


def restart_budget() -> None:
    """Let the budget start again from the bytes live now: the cache is unmapped down to the margin, and the
    largest live total counts from here. A benchmark calls it where it resets its peak-memory count, so that
    a one-off warm-up (FLOP counting) does not set the budget of the timed steps. A no-op when not loaded."""
    if _library is not None:
        _library.dv_pool_restart_budget()


def stats() -> Optional[PoolStats]:
    """The pool's counters, or None when it was never loaded in this process."""
    if _library is None:
        return None
    out = (ctypes.c_int64 * _NUM_STATS)()
    _library.dv_pool_stats(out)
    return PoolStats(*out[:_NUM_STATS - 1], active=bool(out[_NUM_STATS - 1]))


@contextlib.contextmanager
def cpu_pool(enabled: bool = True, margin_mb: int = DEFAULT_MARGIN_MB) -> Iterator[bool]:
    """Install the pool for the ``with`` block (when ``enabled``); yields whether it is in use. A pool that was
    already in use before the block stays installed after it."""
    before = stats()
    already = before is not None and before.active
    used = already or (enabled and install(margin_mb))
    try:
        yield used
    finally:
        if used and not already:
            uninstall()
