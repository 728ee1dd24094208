// On-device sampling: greedy argmax, or temperature / top-k / top-p with a counter-based RNG,
// following reference.sample / sampling_support / sample_row.
//
// One block of 1024 threads per row, no scratch memory. The thresholds are found exactly, by
// searches over the order-preserving integer image ("key") of the raw logits:
//   * x = logit / temperature and w = exp(x - max x) are non-decreasing functions of the logit, so
//     the k-th largest x is (k-th largest logit) / temperature (order statistics commute with a
//     monotone map), and every keep set {x >= thr} or {w >= tau} is an upper set of logit keys.
//   * top-k: a bitwise binary search over keys for the largest key c with count(key >= c) >= k:
//     that is the key of the k-th largest logit (integer work only, no division or exp).
//   * top-p: a radix descent over keys, 4 bits per pass, for the largest key c with
//     S(c) = sum(w over top-k-kept with key >= c) >= top_p * sum(w); then tau = w(c), which equals
//     the reference's tau (the largest w value whose tie-inclusive top set reaches top_p), and the
//     keep test is w >= tau, so ties created by rounding (w underflowing to 0, ...) stay as in the
//     reference.
//   * the token is the first kept index, in index order, whose running sum of w exceeds
//     u * sum(kept w): warp-contiguous segments, per-warp totals, then one warp rescans its segment.
// All sums use a fixed association (per-lane in index order, fixed shuffle trees, warps in order),
// so the same (logits, seed, position) always gives the same token.
#include <cmath>

#include "common.cuh"

namespace ck {
namespace {

// Temperatures below this (and NaN) are greedy: reference.GREEDY_TEMPERATURE. Dividing by a tiny
// temperature overflows fp32 and would make every kept weight NaN.
constexpr float kGreedyTemperature = 1e-5f;

constexpr int kSampleThreads = 1024;
constexpr int kSampleWarps = kSampleThreads / 32;
constexpr int kRound = 32 * 8;  // elements a warp covers per round: 8 per lane (16-byte loads)

// Raw logit bits, their value, and the order-preserving key (flip the sign bit of positives, all
// bits of negatives): a < b as floats implies key(a) <= key(b) as unsigned ints.
struct LogitBF16 {
  using Raw = uint16_t;
  static constexpr int kBits = 16;
  static __device__ __forceinline__ float value(uint32_t r) { return __uint_as_float(r << 16); }
  static __device__ __forceinline__ bool is_nan(uint32_t r) { return (r & 0x7fffu) > 0x7f80u; }
  static __device__ __forceinline__ uint32_t key(uint32_t r) {
    return (r & 0x8000u) ? (~r & 0xffffu) : (r | 0x8000u);
  }
  static __device__ __forceinline__ float key_value(uint32_t k) {
    return value((k & 0x8000u) ? (k & 0x7fffu) : (~k & 0xffffu));
  }
};

struct LogitFP16 {
  using Raw = uint16_t;
  static constexpr int kBits = 16;
  static __device__ __forceinline__ float value(uint32_t r) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(r)));
  }
  static __device__ __forceinline__ bool is_nan(uint32_t r) { return (r & 0x7fffu) > 0x7c00u; }
  static __device__ __forceinline__ uint32_t key(uint32_t r) {
    return (r & 0x8000u) ? (~r & 0xffffu) : (r | 0x8000u);
  }
  static __device__ __forceinline__ float key_value(uint32_t k) {
    return value((k & 0x8000u) ? (k & 0x7fffu) : (~k & 0xffffu));
  }
};

struct LogitFP32 {
  using Raw = uint32_t;
  static constexpr int kBits = 32;
  static __device__ __forceinline__ float value(uint32_t r) { return __uint_as_float(r); }
  static __device__ __forceinline__ bool is_nan(uint32_t r) {
    return (r & 0x7fffffffu) > 0x7f800000u;
  }
  static __device__ __forceinline__ uint32_t key(uint32_t r) {
    return (r & 0x80000000u) ? ~r : (r | 0x80000000u);
  }
  static __device__ __forceinline__ float key_value(uint32_t k) {
    return value((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
  }
};

// 8 raw logits starting at i0 (n of them valid, the rest 0). vec: V % 8 == 0 and aligned rows.
// The logits were just written by the lm_head kernel: coherent loads (after the PDL wait).
template <typename L>
__device__ __forceinline__ void load_raw8(const typename L::Raw* row, int i0, int n, bool vec,
                                          uint32_t (&raw)[8]) {
  if (vec && n == 0) {
    // A lane past the end of its segment (vec: n is 0 or 8): no load, which could otherwise read
    // up to a round past the end of the last row.
#pragma unroll
    for (int j = 0; j < 8; ++j) raw[j] = 0u;
  } else if (vec) {
    if (L::kBits == 16) {
      const uint4 v = ld16(row + i0);
      raw[0] = v.x & 0xffffu; raw[1] = v.x >> 16;
      raw[2] = v.y & 0xffffu; raw[3] = v.y >> 16;
      raw[4] = v.z & 0xffffu; raw[5] = v.z >> 16;
      raw[6] = v.w & 0xffffu; raw[7] = v.w >> 16;
    } else {
      const uint4 a = ld16(row + i0), b = ld16(row + i0 + 4);
      raw[0] = a.x; raw[1] = a.y; raw[2] = a.z; raw[3] = a.w;
      raw[4] = b.x; raw[5] = b.y; raw[6] = b.z; raw[7] = b.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) raw[j] = j < n ? static_cast<uint32_t>(row[i0 + j]) : 0u;
  }
}

// Visits the row: warp w owns the contiguous segment [w S, (w + 1) S) (S a multiple of kRound),
// in rounds of kRound elements, lane l taking 8 consecutive ones. The loop is warp-uniform, so `f`
// may use warp collectives; lanes past the end get n = 0.
template <typename L, typename F>
__device__ __forceinline__ void visit_row(const typename L::Raw* row, int V, int S, bool vec, F&& f) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int seg0 = warp * S;
  const int seg1 = min(seg0 + S, V);
  for (int base = seg0; base < seg1; base += kRound) {
    const int i0 = base + lane * 8;
    const int n = i0 < seg1 ? min(8, seg1 - i0) : 0;
    uint32_t raw[8];
    load_raw8<L>(row, i0, n, vec, raw);
    f(i0, n, raw);
  }
}

// splitmix64 finalizer, constants of reference.mix64.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// reference.uniform: 24 random bits, exact in fp32, in [0, 1).
__device__ __forceinline__ float uniform01(int64_t seed, int64_t counter) {
  const uint64_t h = mix64(static_cast<uint64_t>(seed) ^ mix64(static_cast<uint64_t>(counter)));
  return static_cast<float>(h >> 40) * (1.0f / 16777216.0f);
}

__device__ __forceinline__ unsigned long long shfl_xor_u64(unsigned long long v, int o) {
  return __shfl_xor_sync(0xffffffffu, v, o);
}

// Block max of 64-bit ints (every thread gets it). buf: __shared__ unsigned long long[32].
__device__ __forceinline__ unsigned long long block_max_u64(unsigned long long v,
                                                            unsigned long long* buf) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long other = shfl_xor_u64(v, o);
    v = other > v ? other : v;
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
  __syncthreads();
  unsigned long long r = buf[0];
  for (int i = 1; i < kSampleWarps; ++i) r = buf[i] > r ? buf[i] : r;
  return r;
}

// Block sum of ints (every thread gets it). buf: __shared__ int[32].
__device__ __forceinline__ int block_sum_int(int v, int* buf) {
  v = __reduce_add_sync(0xffffffffu, v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
  __syncthreads();
  int r = 0;
  for (int i = 0; i < kSampleWarps; ++i) r += buf[i];
  return r;
}

// Inclusive warp prefix sum (Hillis-Steele; fixed association, identical on every call).
__device__ __forceinline__ float warp_inclusive_scan(float v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float other = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += other;
  }
  return v;
}

// grid B, block kSampleThreads.
template <typename L>
__global__ void __launch_bounds__(kSampleThreads)
sample_kernel(const typename L::Raw* logits,  // [B, V]
              const float* temperature,       // [B]
              const int32_t* top_k,           // [B]
              const float* top_p,             // [B]
              const int64_t* seed,            // [B]
              int32_t* positions,             // [B] in/out
              int32_t* token_in,              // [B] out
              int32_t* token_hist,            // [B, hist_len] out
              int V, int hist_len, bool vec) {
  using Raw = typename L::Raw;
  __shared__ int s_pos;
  __shared__ float s_temp, s_top_p;
  __shared__ int s_top_k;
  __shared__ long long s_seed;
  __shared__ unsigned long long s_u64[32];
  __shared__ int s_int[32];
  __shared__ float s_acc[kSampleWarps][16];
  __shared__ float s_red[16];
  __shared__ uint32_t s_prefix;
  __shared__ float s_above, s_need;
  __shared__ float s_warp_total[kSampleWarps];
  __shared__ int s_warp_last[kSampleWarps];
  __shared__ int s_cross_warp;
  __shared__ float s_target, s_cross_base;
  __shared__ int s_tok;

  pdl_begin();
  const int b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const Raw* row = logits + static_cast<int64_t>(b) * V;
  // Segment per warp, a multiple of a round so that rounds never straddle two warps.
  const int S = ceil_div(ceil_div(V, kSampleWarps), kRound) * kRound;

  if (tid == 0) {
    // The row's position is read once, here: the kernel increments it at the very end.
    s_pos = positions[b];
    s_temp = temperature[b];
    s_top_k = top_k[b];
    s_top_p = top_p[b];
    s_seed = seed[b];
  }
  __syncthreads();
  // Padding row: nothing to sample, nothing written, the position stays (block-uniform exit).
  if (s_pos < 0) return;
  const float temp = s_temp;
  int tok = 0;

  if (!(temp >= kGreedyTemperature)) {
    // ---- greedy: first index of the max (NaN counts as the max, like torch.argmax).
    unsigned long long best = 0;
    visit_row<L>(row, V, S, vec, [&](int i0, int n, const uint32_t(&raw)[8]) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j < n) {
          uint32_t k;
          if (L::is_nan(raw[j])) {
            k = 0xffffffffu;
          } else {
            // -0 and +0 compare equal in torch: give them one key so the first index wins.
            const bool neg_zero = L::kBits == 16 ? raw[j] == 0x8000u : raw[j] == 0x80000000u;
            k = L::key(neg_zero ? 0u : raw[j]);
          }
          const unsigned long long packed =
              (static_cast<unsigned long long>(k) << 32) | (0xffffffffu - static_cast<uint32_t>(i0 + j));
          best = packed > best ? packed : best;
        }
      }
    });
    best = block_max_u64(best, s_u64);
    tok = static_cast<int>(0xffffffffu - static_cast<uint32_t>(best & 0xffffffffu));
  } else {
    const int top_k_v = s_top_k;
    const float top_p_v = s_top_p;

    // ---- max over non-NaN logits (as a key) -> max x = max logit / temperature.
    unsigned long long kmax = 0;
    visit_row<L>(row, V, S, vec, [&](int, int n, const uint32_t(&raw)[8]) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j < n && !L::is_nan(raw[j])) {
          const unsigned long long k = L::key(raw[j]) + 1ull;  // 0 stays "nothing seen"
          kmax = k > kmax ? k : kmax;
        }
      }
    });
    kmax = block_max_u64(kmax, s_u64);
    const uint32_t max_key = kmax > 0 ? static_cast<uint32_t>(kmax - 1) : 0u;
    const float xmax = __fdiv_rn(L::key_value(max_key), temp);

    // ---- top-k: key of the k-th largest logit; keep x >= thr_x (ties kept).
    float thr_x = -INFINITY;
    if (top_k_v > 0 && top_k_v < V) {
      uint32_t prefix = 0;
      for (int bit = L::kBits - 1; bit >= 0; --bit) {
        const uint32_t cand = prefix | (1u << bit);
        int cnt = 0;
        visit_row<L>(row, V, S, vec, [&](int, int n, const uint32_t(&raw)[8]) {
#pragma unroll
          for (int j = 0; j < 8; ++j)
            cnt += (j < n && !L::is_nan(raw[j]) && L::key(raw[j]) >= cand) ? 1 : 0;
        });
        cnt = block_sum_int(cnt, s_int);
        if (cnt >= top_k_v) prefix = cand;  // uniform: every thread has the same cnt
      }
      thr_x = __fdiv_rn(L::key_value(prefix), temp);
    }

    // ---- top-p: radix descent, 4 key bits per pass, for the largest key c with S(c) >= need.
    float tau = 0.f;  // w >= 0 keeps everything
    if (top_p_v < 1.f) {
      if (tid == 0) {
        s_prefix = 0;
        s_above = 0.f;
        s_need = 0.f;
      }
      for (int level = 0; level < L::kBits / 4; ++level) {
        const int shift = L::kBits - 4 * (level + 1);
        __syncthreads();  // s_prefix of the previous level visible; s_acc / s_red free
        const uint32_t prefix = s_prefix;
        float acc[16];
#pragma unroll
        for (int d = 0; d < 16; ++d) acc[d] = 0.f;
        visit_row<L>(row, V, S, vec, [&](int, int n, const uint32_t(&raw)[8]) {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (j < n && !L::is_nan(raw[j])) {
              const float x = __fdiv_rn(L::value(raw[j]), temp);
              const uint32_t k = L::key(raw[j]);
              if (x >= thr_x && (level == 0 || (k >> (shift + 4)) == prefix)) {
                const float w = expf(x - xmax);
                const uint32_t digit = (k >> shift) & 15u;
#pragma unroll
                for (int d = 0; d < 16; ++d) acc[d] += (digit >= static_cast<uint32_t>(d)) ? w : 0.f;
              }
            }
          }
        });
        // acc[d] = sum of w with this prefix and digit >= d; reduce over the block in fixed order.
#pragma unroll
        for (int d = 0; d < 16; ++d) acc[d] = warp_sum(acc[d]);
        if (lane == 0) {
#pragma unroll
          for (int d = 0; d < 16; ++d) s_acc[warp][d] = acc[d];
        }
        __syncthreads();
        if (tid < 16) {
          float r = 0.f;
          for (int w = 0; w < kSampleWarps; ++w) r += s_acc[w][tid];
          s_red[tid] = r;
        }
        __syncthreads();
        if (tid == 0) {
          const float above = s_above;
          if (level == 0) s_need = __fmul_rn(top_p_v, s_red[0]);  // s_red[0] = sum of all kept w
          const float need = s_need;
          int pick = 0;  // none reaches need (rounding, top_p ~ 1): lowest bucket keeps the most
          for (int d = 15; d >= 0; --d) {
            if (above + s_red[d] >= need) {
              pick = d;
              break;
            }
          }
          s_above = pick < 15 ? above + s_red[pick + 1] : above;
          s_prefix = (prefix << 4) | static_cast<uint32_t>(pick);
        }
      }
      __syncthreads();
      uint32_t c = s_prefix;
      if (c > max_key) c = max_key;  // top_p <= 0: need = 0 is met by every key; keep the max
      tau = expf(__fdiv_rn(L::key_value(c), temp) - xmax);
      // No bucket reached `need` at the top level (need > sum by rounding, top_p ~ 1): the descent
      // ends on key 0, a NaN pattern; like the reference's clamp, keep everything top-k kept.
      if (isnan(tau)) tau = 0.f;
    }

    // ---- draw: per-warp totals of kept w (the same rounds and scans the rescan below repeats).
    auto lane_weight = [&](int n, const uint32_t(&raw)[8], float (&w8)[8]) {
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        w8[j] = -1.f;  // not kept
        if (j < n && !L::is_nan(raw[j])) {
          const float x = __fdiv_rn(L::value(raw[j]), temp);
          if (x >= thr_x) {
            const float w = expf(x - xmax);
            if (w >= tau) {
              w8[j] = w;
              sum += w;
            }
          }
        }
      }
      return sum;
    };

    float warp_total = 0.f;
    int last_kept = -1;
    visit_row<L>(row, V, S, vec, [&](int i0, int n, const uint32_t(&raw)[8]) {
      float w8[8];
      const float ls = lane_weight(n, raw, w8);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (w8[j] >= 0.f) last_kept = i0 + j;
      const float incl = warp_inclusive_scan(ls);
      warp_total += __shfl_sync(0xffffffffu, incl, 31);
    });
    last_kept = __reduce_max_sync(0xffffffffu, last_kept);
    if (lane == 0) {
      s_warp_total[warp] = warp_total;
      s_warp_last[warp] = last_kept;
    }
    __syncthreads();
    if (tid == 0) {
      const float u = uniform01(s_seed, s_pos);
      float prefix = 0.f;
      for (int w = 0; w < kSampleWarps; ++w) prefix += s_warp_total[w];
      const float target = __fmul_rn(u, prefix);  // u * sum(kept w)
      int cross = -1;
      float base = 0.f, run = 0.f;
      for (int w = 0; w < kSampleWarps; ++w) {
        const float next = run + s_warp_total[w];
        if (next > target) {
          cross = w;
          base = run;
          break;
        }
        run = next;
      }
      int last = -1;
      for (int w = 0; w < kSampleWarps; ++w) last = s_warp_last[w] > last ? s_warp_last[w] : last;
      s_cross_warp = cross;
      s_target = target;
      s_cross_base = base;
      // Default: no crossing (target rounded up to the total) -> the last kept index, as the
      // reference clamps; no kept element at all (all NaN) -> 0.
      s_tok = cross >= 0 ? (s_warp_last[cross] >= 0 ? s_warp_last[cross] : 0) : (last >= 0 ? last : 0);
    }
    __syncthreads();

    // ---- the crossing warp rescans its segment to find the exact index.
    if (warp == s_cross_warp) {
      const float target = s_target;
      float running = s_cross_base;
      bool found = false;
      visit_row<L>(row, V, S, vec, [&](int i0, int n, const uint32_t(&raw)[8]) {
        if (found) return;  // warp-uniform
        float w8[8];
        const float ls = lane_weight(n, raw, w8);
        const float incl = warp_inclusive_scan(ls);
        const float round_total = __shfl_sync(0xffffffffu, incl, 31);
        if (running + round_total > target) {
          const unsigned hit = __ballot_sync(0xffffffffu, running + incl > target);
          const int hl = __ffs(hit) - 1;  // hit != 0: lane 31's incl is round_total
          if (lane == hl) {
            const float excl = incl - ls;
            float r = running + excl;
            int pick = -1, last = -1;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              if (w8[j] >= 0.f) {
                last = i0 + j;
                r += w8[j];
                if (pick < 0 && r > target) pick = i0 + j;
              }
            }
            // Rounding can leave r <= target: fall back to the lane's last kept index.
            s_tok = pick >= 0 ? pick : (last >= 0 ? last : s_tok);
          }
          found = true;
        } else {
          running += round_total;
        }
      });
    }
    __syncthreads();
    tok = s_tok;
  }

  if (tid == 0) {
    const int pos = s_pos;
    token_in[b] = tok;
    if (pos + 1 >= 0 && pos + 1 < hist_len) token_hist[static_cast<int64_t>(b) * hist_len + pos + 1] = tok;
    positions[b] = pos + 1;
  }
}

}  // namespace

cudaError_t launch_sample(const void* logits, const float* temperature, const int32_t* top_k,
                          const float* top_p, const int64_t* seed, int32_t* positions,
                          int32_t* token_in, int32_t* token_hist, int B, int V, int hist_len,
                          DType logits_dt, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (B < 0 || V <= 0 || hist_len <= 0) return cudaErrorInvalidValue;
  const bool vec = V % 8 == 0 && aligned16(logits);
  switch (logits_dt) {
    case DType::BF16:
      CK_LAUNCH(sample_kernel<LogitBF16>, dim3(B), dim3(kSampleThreads), 0, stream,
                static_cast<const uint16_t*>(logits), temperature, top_k, top_p, seed, positions,
                token_in, token_hist, V, hist_len, vec);
      break;
    case DType::FP16:
      CK_LAUNCH(sample_kernel<LogitFP16>, dim3(B), dim3(kSampleThreads), 0, stream,
                static_cast<const uint16_t*>(logits), temperature, top_k, top_p, seed, positions,
                token_in, token_hist, V, hist_len, vec);
      break;
    case DType::FP32:
      CK_LAUNCH(sample_kernel<LogitFP32>, dim3(B), dim3(kSampleThreads), 0, stream,
                static_cast<const uint32_t*>(logits), temperature, top_k, top_p, seed, positions,
                token_in, token_hist, V, hist_len, vec);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  CK_RETURN_LAUNCH_STATUS();
}

}  // namespace ck
