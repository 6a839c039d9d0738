"""Experiment: a training step on CPU with a budgeted caching allocator in place of glibc's, A/B.

    .venv/bin/pip install ninja   # torch.utils.cpp_extension builds the allocator (~30 s, once)
    .venv/bin/python benchmarks/pool_allocator.py --iters 3 --repeats 2 [--margin_mb 64]

Not used by training. It measures what the README (Performance, Memory) describes: at 512 px glibc either
keeps freed heap blocks resident (0.5-0.8 GB of gaps at the peak) or hands every large block back to the
kernel, which must zero-fill it again on the next use (a page fault per 4 KiB). The allocator here serves
blocks of ``MIN_POOLED_BYTES`` and up from its own mappings and keeps freed ones for reuse by exact
(rounded) size, but only while live + cached bytes stay within the largest live total seen so far plus
``--margin_mb``: near the step's peak, least recently freed blocks are unmapped first. The peak resident
set is then about the live tensors' peak plus the margin, and most allocations away from the peak are
reused without faults. Smaller requests go to the default allocator.

Each arm (``glibc``, ``pool``) runs ``speed.run_train`` in a fresh process, alternating, ``--repeats``
times; the allocator is installed before the model is built. The last line printed is one JSON object.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402  (benchmarks/speed.py: model flags, the timed training step)

MIN_POOLED_BYTES = 1 << 20  # smaller blocks: glibc, whose size classes handle them well
ROUND_BYTES = 1 << 16  # pooled sizes are rounded up to this, so near-equal requests share blocks

_CPP_SOURCE = r"""
#include <torch/extension.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

struct Block { size_t size; void* ptr; };

class BudgetPool final : public c10::Allocator {
 public:
  BudgetPool(c10::Allocator* small, size_t min_bytes, size_t round_bytes, size_t margin)
      : small_(small), min_bytes_(min_bytes), round_bytes_(round_bytes), margin_(margin) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes_) return small_->allocate(n);
    const size_t size = (n + round_bytes_ - 1) / round_bytes_ * round_bytes_;
    void* ptr = nullptr;
    std::vector<Block> unmap;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto hit = free_.find(size);
      if (hit != free_.end()) {
        ptr = hit->second;
        free_.erase(hit);
        order_.erase(position_.at(ptr));
        position_.erase(ptr);
        cached_ -= size;
        ++hits_;
      } else {
        ++misses_;
      }
      live_ += size;
      shrink_locked(&unmap);
    }
    release(unmap);
    if (ptr == nullptr) {
      ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(ptr != MAP_FAILED, "pool allocator: mmap of ", size, " bytes failed");
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      sizes_[ptr] = size;
    }
    return {ptr, ptr, &BudgetPool::deallocate, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BudgetPool::deallocate; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  void give_back(void* ptr) {
    std::vector<Block> unmap;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto known = sizes_.find(ptr);
      if (known == sizes_.end()) {  // a small block from the default allocator (raw interface)
        small_->raw_deleter()(ptr);
        return;
      }
      const size_t size = known->second;
      sizes_.erase(known);
      live_ -= size;
      order_.push_back({size, ptr});
      position_[ptr] = std::prev(order_.end());
      free_.emplace(size, ptr);
      cached_ += size;
      shrink_locked(&unmap);
    }
    release(unmap);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(live_), static_cast<int64_t>(cached_), static_cast<int64_t>(peak_live_),
            static_cast<int64_t>(hits_), static_cast<int64_t>(misses_)};
  }

  static void deallocate(void* ptr);

 private:
  // Keep live + cached within the largest live total seen plus the margin; unmap the oldest first.
  void shrink_locked(std::vector<Block>* unmap) {
    if (live_ > peak_live_) peak_live_ = live_;
    const size_t allowed = peak_live_ + margin_ - live_;
    while (cached_ > allowed && !order_.empty()) {
      Block oldest = order_.front();
      order_.pop_front();
      position_.erase(oldest.ptr);
      auto same = free_.equal_range(oldest.size);
      for (auto it = same.first; it != same.second; ++it) {
        if (it->second == oldest.ptr) { free_.erase(it); break; }
      }
      cached_ -= oldest.size;
      unmap->push_back(oldest);
    }
  }

  static void release(const std::vector<Block>& blocks) {
    for (const Block& b : blocks) munmap(b.ptr, b.size);
  }

  c10::Allocator* small_;
  const size_t min_bytes_, round_bytes_, margin_;
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  std::list<Block> order_;  // cached blocks, least recently freed first
  std::unordered_map<void*, std::list<Block>::iterator> position_;
  std::unordered_map<void*, size_t> sizes_;  // every pooled block handed out or cached
  size_t live_ = 0, cached_ = 0, peak_live_ = 0, hits_ = 0, misses_ = 0;
};

BudgetPool* pool = nullptr;

void BudgetPool::deallocate(void* ptr) { pool->give_back(ptr); }

}  // namespace

void install(int64_t min_bytes, int64_t round_bytes, int64_t margin_bytes) {
  TORCH_CHECK(pool == nullptr, "pool allocator: already installed");
  pool = new BudgetPool(c10::GetCPUAllocator(), min_bytes, round_bytes, margin_bytes);  // never freed
  c10::SetCPUAllocator(pool, /*priority=*/100);
}

std::vector<int64_t> stats() {
  TORCH_CHECK(pool != nullptr, "pool allocator: not installed");
  return pool->stats();
}
"""


def build_parser():
    p = speed.build_parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--margin_mb", type=int, default=64, help="cache allowed above the largest live total")
    p.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating")
    p.add_argument("--arm", choices=("glibc", "pool"), default=None, help="internal: run one arm here")
    return p


def install_pool(margin_mb: int) -> Any:
    """Build (once; cached by torch.utils.cpp_extension) and install the allocator; returns the module."""
    from torch.utils.cpp_extension import load_inline
    try:
        module = load_inline(name="deepvoxels_budget_pool", cpp_sources=_CPP_SOURCE,
                             functions=["install", "stats"], extra_cflags=["-O2"])
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SystemExit(f"pool_allocator: cannot build the allocator (needs a C++ compiler and ninja: "
                         f".venv/bin/pip install ninja): {first}") from None
    module.install(MIN_POOLED_BYTES, ROUND_BYTES, margin_mb << 20)
    return module


def run_arm(args) -> dict[str, Any]:
    import torch
    if speed.REPO_ROOT not in sys.path:
        sys.path.insert(0, speed.REPO_ROOT)
    if args.threads:
        torch.set_num_threads(args.threads)
    module = install_pool(args.margin_mb) if args.arm == "pool" else None
    result = speed.run_train(args)
    out = {"arm": args.arm, "train_times": result["train_times"], "train_s_per_iter": result["train_s_per_iter"],
           "train_peak_rss_mb": result["train_peak_rss_mb"]}
    if module is not None:
        live, cached, peak_live, hits, misses = module.stats()
        out.update(pool_peak_live_mb=peak_live / 2 ** 20, pool_cached_mb=cached / 2 ** 20, pool_hits=hits,
                   pool_misses=misses)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.arm is not None:
        print(json.dumps(run_arm(args)))
        return 0
    runs: dict[str, list] = {"glibc": [], "pool": []}
    for _ in range(args.repeats):
        for arm in runs:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--arm", arm],
                                  stdout=subprocess.PIPE, text=True, cwd=speed.REPO_ROOT)
            if proc.returncode != 0:
                print(f"pool_allocator: the {arm} arm failed (exit {proc.returncode}; its error is above)",
                      file=sys.stderr)
                return 1
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[arm].append(res)
            print(f"{arm:6s} train {res['train_s_per_iter']:.2f} s/iter  peak RSS {res['train_peak_rss_mb']:.0f} MB"
                  + (f"  (pool: peak live {res['pool_peak_live_mb']:.0f} MB, {res['pool_hits']} hits, "
                     f"{res['pool_misses']} misses)" if arm == "pool" else ""), flush=True)
    summary = {arm: {"train_s_per_iter": statistics.median(r["train_s_per_iter"] for r in rs),
                     "peak_rss_mb": statistics.median(r["train_peak_rss_mb"] for r in rs)}
               for arm, rs in runs.items()}
    summary["margin_mb"] = args.margin_mb
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
