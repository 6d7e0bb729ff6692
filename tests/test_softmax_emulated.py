"""The CUDA softmax kernels of csrc/softmax_kernels.cuh run on the CPU under an emulation of the
CUDA built-ins, so that their logic is checked on machines without a GPU (docs/design.md §4 rules).

The emulation (``EMULATION`` below, compiled with g++ once per session) runs each block of a launch
after the previous one, each CUDA thread of it as an OS thread: ``__syncthreads`` is a barrier of
the block, a warp shuffle a write to a shared slot between two barriers of the warp, shared memory
a static array (static) or a buffer poisoned with NaN bytes (dynamic). It runs the header's own
host plan and launch code, so the kernel each length takes is the one a GPU takes with the same
shared memory budget. Blocks run one after another: races between blocks are invisible, and so
is anything about speed; the real build and the GPU tests remain the proof of those.
"""

import os
import shutil
import subprocess

import pytest
import torch
from conftest import dtype_params

from lightllm.reference import softmax as reference
from lightllm.testing import assert_parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The H200's opt-in shared memory per block less softmax_cuda.cu's 1 KiB for static arrays.
SMEM_BUDGET = 232448 - 1024

EMULATION = r"""
#define LIGHTLLM_EMULATE_CUDA
#define LIGHTLLM_NO_TORCH
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

using cudaStream_t = void*;

namespace emu {
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local Dim3 thread_idx, block_idx;
Dim3 block_dim, grid_dim;
unsigned char* dynamic_smem = nullptr;
int64_t smem_budget = 0;
std::unique_ptr<std::barrier<>> block_barrier;
std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
float shuffle_slots[1024];

inline void syncthreads() { block_barrier->arrive_and_wait(); }

inline float shfl_xor(float v, int o) {
  const int t = thread_idx.x, w = t / 32;
  shuffle_slots[t] = v;
  warp_barriers[w]->arrive_and_wait();
  const float r = shuffle_slots[w * 32 + ((t % 32) ^ o)];
  warp_barriers[w]->arrive_and_wait();
  return r;
}

void launch(int64_t blocks, int threads, size_t smem, const std::function<void()>& kernel) {
  if (threads % 32 != 0 || threads > 1024) { std::fprintf(stderr, "bad block\n"); std::exit(2); }
  if (static_cast<int64_t>(smem) > smem_budget) { std::fprintf(stderr, "smem\n"); std::exit(2); }
  std::vector<unsigned char> buffer(smem + 16);
  grid_dim = {static_cast<unsigned>(blocks), 1, 1};
  block_dim = {static_cast<unsigned>(threads), 1, 1};
  for (int64_t b = 0; b < blocks; ++b) {
    std::memset(buffer.data(), 0xff, buffer.size());  // NaN: reading what no thread wrote shows
    dynamic_smem = buffer.data() + (16 - reinterpret_cast<uintptr_t>(buffer.data()) % 16) % 16;
    block_barrier = std::make_unique<std::barrier<>>(threads);
    warp_barriers.clear();
    for (int w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t, b] {
        thread_idx = {static_cast<unsigned>(t), 0, 0};
        block_idx = {static_cast<unsigned>(b), 0, 0};
        kernel();
        // An exited thread no longer takes part in barriers, as on the GPU.
        warp_barriers[t / 32]->arrive_and_drop();
        block_barrier->arrive_and_drop();
      });
    }
    for (auto& th : pool) th.join();
  }
}
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() emu::syncthreads()
#define __shfl_xor_sync(mask, v, o) emu::shfl_xor(v, o)
#define __expf(v) std::exp(v)
#define LL_DYNAMIC_SMEM(name) float* name = reinterpret_cast<float*>(emu::dynamic_smem)
#define LL_LAUNCH(kernel, blocks, threads, smem, stream, ...) \
  emu::launch(blocks, threads, smem, [&] { kernel(__VA_ARGS__); })
#define LL_ALLOW_SMEM(kernel, bytes) ((void)0)

#include "softmax_kernels.cuh"

using namespace lightllm;

static std::vector<char> read_file(const char* path) {
  FILE* f = std::fopen(path, "rb");
  std::vector<char> data;
  char chunk[65536];
  for (size_t got; (got = std::fread(chunk, 1, sizeof chunk, f)) > 0;) {
    data.insert(data.end(), chunk, chunk + got);
  }
  std::fclose(f);
  return data;
}

static const char* path_name(cuda::Path p) {
  return p == cuda::Path::kWarp ? "warp" : p == cuda::Path::kBlock ? "block" : "split";
}

// fwd|bwd dtype rows n mask(none|bool|add|softmax) scale causal smem_budget in out
template <typename T>
static int run(char** argv) {
  const std::string op = argv[1], mask = argv[5];
  const int64_t rows = std::atoll(argv[3]), n = std::atoll(argv[4]);
  const float scale = std::atof(argv[6]);
  emu::smem_budget = std::atoll(argv[8]);
  std::vector<char> in = read_file(argv[9]);
  std::vector<T> out(rows * n);
  std::memset(out.data(), 0xff, out.size() * sizeof(T));
  const char* base = in.data();
  std::vector<float> ws;
  cuda::Plan plan;
  if (op == "fwd") {
    SoftmaxFwdArgs a{};
    a.x = base; a.y = out.data(); a.rows = rows; a.n = n; a.x_row_stride = n; a.scale = scale;
    a.causal = std::atoi(argv[7]); a.nq = rows; a.zero_masked_rows = mask != "softmax";
    a.mask_kind = mask == "bool" ? kBoolMask : mask == "add" ? kAdditiveMask : kNoMask;
    if (a.mask_kind != kNoMask) {
      a.mask = base + rows * n * sizeof(T);
      a.mask_col_stride = 1; a.mask_ndim = 1; a.mask_sizes[0] = rows; a.mask_strides[0] = n;
    }
    plan = cuda::plan_fwd<T>(a, emu::smem_budget);
    ws.resize(plan.workspace);
    cuda::launch_fwd<T>(a, plan, ws.data(), nullptr);
  } else {
    SoftmaxBwdArgs a{};
    a.y = base; a.dy = base + rows * n * sizeof(T); a.dx = out.data(); a.rows = rows; a.n = n;
    a.y_row_stride = n; a.dy_row_stride = n; a.scale = scale;
    plan = cuda::plan_bwd<T>(a, emu::smem_budget);
    ws.resize(plan.workspace);
    cuda::launch_bwd<T>(a, plan, ws.data(), nullptr);
  }
  FILE* f = std::fopen(argv[10], "wb");
  std::fwrite(out.data(), sizeof(T), out.size(), f);
  std::fclose(f);
  std::printf("%s%s\n", path_name(plan.path), plan.raw ? "-raw" : "");
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 11) return 2;
  const std::string dtype = argv[2];
  if (dtype == "float32") return run<float>(argv);
  if (dtype == "float16") return run<c10::Half>(argv);
  return run<c10::BFloat16>(argv);
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++ to compile the CUDA emulation")
    folder = tmp_path_factory.mktemp("softmax_emulation")
    source, binary = folder / "emulation.cpp", folder / "emulation"
    source.write_text(EMULATION)
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    subprocess.run(["g++", "-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas",
                    f"-I{ROOT}/csrc", f"-I{include}", str(source), "-o", str(binary)],
                   check=True, capture_output=True)
    return binary, folder


def _raw(t: torch.Tensor) -> bytes:
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(bits).numpy().tobytes()


def _emulate(emulator, op, inputs, rows, n, dtype, mask="none", scale=1.0, causal=False):
    """Run one launch under the emulation; returns (the kernel path taken, the output)."""
    binary, folder = emulator
    src, dst = folder / "in.bin", folder / "out.bin"
    src.write_bytes(b"".join(_raw(t) for t in inputs))
    done = subprocess.run([str(binary), op, str(dtype).replace("torch.", ""), str(rows), str(n),
                           mask, repr(scale), str(int(causal)), str(SMEM_BUDGET), str(src),
                           str(dst)], check=True, capture_output=True, text=True)
    bits = {2: torch.int16, 4: torch.int32}[torch.empty((), dtype=dtype).element_size()]
    out = torch.frombuffer(bytearray(dst.read_bytes()), dtype=bits).view(dtype).view(rows, n)
    return done.stdout.strip(), out


# 1500 and 3000: the block kernel keeping fp32 z in every dtype; 57857: one element past the
# longest row kept as fp32 z (SMEM_BUDGET / 4), which 16-bit rows keep as raw inputs ("block-raw")
# unless an additive mask brings them back to 4 bytes per element (the split path).
ROWS = 3


def _expected_path(n, dtype, mask):
    if n <= 1024:
        return "warp"
    if (n + 7) // 8 * 8 * 4 <= SMEM_BUDGET:
        return "block"
    raw = 2 + {"bool": 1, "add": 2}.get(mask, 0)
    fits_raw = dtype != torch.float32 and (n + 7) // 8 * 8 * raw <= SMEM_BUDGET
    return "block-raw" if fits_raw else "split"


@pytest.mark.parametrize("n", [1500, 3000, 57857])
# A negative scale: the elements past n in a row's last vector must be -inf, not scale * -inf.
@pytest.mark.parametrize("mask,scale,causal", [("softmax", 1.0, False), ("none", -0.6, False),
                                               ("none", 0.5, True), ("bool", 0.7, False),
                                               ("add", 0.7, False)])
@pytest.mark.parametrize("dtype", dtype_params(interpreted=False))
def test_forward_emulated(emulator, dtype, n, mask, scale, causal):
    x = torch.randn(ROWS, n, dtype=dtype) * 4
    m = None
    if mask == "bool":
        m = torch.rand(ROWS, n) > 0.5
    elif mask == "add":
        m = torch.randn(ROWS, n, dtype=dtype)
    path, y = _emulate(emulator, "fwd", [x] + ([m] if m is not None else []), ROWS, n, dtype,
                       mask, scale, causal)
    assert path == _expected_path(n, dtype, mask)
    if mask == "softmax":
        y_ref, y_torch = torch.softmax(x.double(), -1), torch.softmax(x, -1)
    else:
        m64 = m.double() if mask == "add" else m
        y_ref = reference.scaled_masked_softmax(x.double(), m64, scale, causal)
        y_torch = reference.scaled_masked_softmax(x, m, scale, causal)
    assert_parity(y, y_ref, y_torch, name="y")


@pytest.mark.parametrize("n", [1500, 3000, 57857])
@pytest.mark.parametrize("dtype", dtype_params(interpreted=False))
def test_backward_emulated(emulator, dtype, n):
    y = torch.softmax(torch.randn(ROWS, n) * 4, -1).to(dtype)
    dy = torch.randn(ROWS, n, dtype=dtype)
    scale = 0.7
    path, dx = _emulate(emulator, "bwd", [y, dy], ROWS, n, dtype, scale=scale)
    # The backward keeps y and dy raw: 2 * sizeof(T) bytes per element.
    per_elem = 2 * y.element_size()
    assert path == ("block" if (n + 7) // 8 * 8 * per_elem <= SMEM_BUDGET else "split")
    y64, dy64 = y.double(), dy.double()
    dx_ref = scale * y64 * (dy64 - (dy64 * y64).sum(-1, keepdim=True))
    dx_torch = torch._softmax_backward_data(dy, y, -1, dtype) * scale
    assert_parity(dx, dx_ref, dx_torch, grad=True, name="dx")


@pytest.mark.parametrize("mask", ["none", "bool", "add"])
@pytest.mark.parametrize("dtype", dtype_params(interpreted=False))
def test_causal_rows_emulated(emulator, dtype, mask):
    """Causal rows whose diagonals fall in every vector of the first 97 elements: each reads only
    up to its diagonal and writes 0s past it (block kernel at n = 1500)."""
    rows, n = 97, 1500
    x = torch.randn(rows, n, dtype=dtype) * 4
    m = {"none": None, "bool": torch.rand(rows, n) > 0.3,
         "add": torch.randn(rows, n, dtype=dtype)}[mask]
    path, y = _emulate(emulator, "fwd", [x] + ([m] if m is not None else []), rows, n, dtype,
                       mask, 0.6, True)
    assert path == "block"
    m64 = m.double() if mask == "add" else m
    assert_parity(y, reference.scaled_masked_softmax(x.double(), m64, 0.6, True),
                  reference.scaled_masked_softmax(x, m, 0.6, True), name="y")
