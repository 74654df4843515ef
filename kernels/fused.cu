// stepstream's fused CUDA kernels, compiled to PTX by build.rs when the `cuda` feature is on.
//
// 1. Attention without a materialised score matrix (flash-style): each block owns 64 query rows of
//    one (batch, head); it walks the keys in tiles of 64, keeps a running row maximum and row sum,
//    and accumulates the weighted values in f32. The two matrix products run on tensor cores (WMMA,
//    16x16x16 fragments); the online softmax and the rescaling run in shared memory, so no
//    assumption about the fragments' register layout is needed.
// 2. GroupNorm(+SiLU) in two launches: per-chunk Welford partials, then one elementwise pass that
//    merges its group's partials, normalises, applies the per-channel affine and optionally SiLU.
//
// All statistics and accumulations are f32; inputs and outputs are f16, bf16 or (GroupNorm) f32.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>

using namespace nvcuda;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

#define ATT_BR 64      // query rows per block (16 per warp)
#define ATT_BC 64      // keys per tile
#define ATT_WARPS 4
#define ATT_S_LD (ATT_BC + 4)   // f32 score row stride (floats)
#define ATT_P_LD (ATT_BC + 8)   // probability row stride (elements)

// Shared-memory bytes the attention kernel needs for padded head width `dp` (a multiple of 16).
// Kept in sync with the Rust side (`attention_smem_bytes`).
__host__ __device__ inline size_t att_smem_bytes(int dp) {
    size_t ld = dp + 8;
    size_t qkv = 3 * ATT_BR * ld * 2;
    size_t s = ATT_WARPS * 16 * ATT_S_LD * 4;
    size_t p = ATT_WARPS * 16 * ATT_P_LD * 2;
    size_t o = ATT_WARPS * 16 * (dp + 4) * 4;
    return qkv + s + p + o;
}

// Copies 64 rows of `d` elements (global row stride `stride`) into shared rows of stride `ld`,
// zero-filling rows >= valid and columns >= d up to dp. d and stride must be multiples of 8
// (16-byte vectors).
template <typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int valid, int d, int dp, int ld,
                                          int stride) {
    const int vec_per_row = dp / 8;
    const int d_vecs = d / 8;
    for (int i = threadIdx.x; i < ATT_BR * vec_per_row; i += blockDim.x) {
        int r = i / vec_per_row, c = i % vec_per_row;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < valid && c < d_vecs) {
            v = *reinterpret_cast<const uint4*>(src + (size_t)r * stride + c * 8);
        }
        *reinterpret_cast<uint4*>(dst + r * ld + c * 8) = v;
    }
}

// q, out: (b, n, heads * d), k, v: (b, m, heads * d); all contiguous (head hd of token t at
// t * heads * d + hd * d). grid = (ceil(n / 64), b * heads), block = 128 threads, dynamic shared
// memory = att_smem_bytes(dp). scale_log2 = scale * log2(e).
template <typename T>
__device__ void attention_impl(const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, T* __restrict__ out, int n, int m,
                               int heads, int d, int dp, float scale_log2) {
    extern __shared__ __align__(128) unsigned char smem[];  // WMMA wants 32-byte alignment
    const int ld = dp + 8;
    T* sQ = reinterpret_cast<T*>(smem);
    T* sK = sQ + ATT_BR * ld;
    T* sV = sK + ATT_BR * ld;
    float* sS = reinterpret_cast<float*>(sV + ATT_BR * ld);
    T* sP = reinterpret_cast<T*>(sS + ATT_WARPS * 16 * ATT_S_LD);
    float* sO = reinterpret_cast<float*>(sP + ATT_WARPS * 16 * ATT_P_LD);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int bi = blockIdx.y / heads, hi = blockIdx.y % heads;
    const int row_stride = heads * d;
    const int q0 = blockIdx.x * ATT_BR;
    const int o_ld = dp + 4;
    float* wS = sS + warp * 16 * ATT_S_LD;
    T* wP = sP + warp * 16 * ATT_P_LD;
    float* wO = sO + warp * 16 * o_ld;

    load_tile(sQ, q + ((size_t)bi * n + q0) * row_stride + hi * d, min(ATT_BR, n - q0), d, dp, ld,
              row_stride);
    for (int i = lane; i < 16 * o_ld; i += 32) wO[i] = 0.f;

    // Lane pair (r, r + 16) owns row r of this warp's 16 rows; each lane half the columns.
    const int row = lane & 15, half_sel = lane >> 4;
    float m_run = -INFINITY, l_run = 0.f;

    for (int k0 = 0; k0 < m; k0 += ATT_BC) {
        const int kvalid = min(ATT_BC, m - k0);
        __syncthreads();  // everyone is done with the previous K/V tile
        const size_t kv_off = ((size_t)bi * m + k0) * row_stride + hi * d;
        load_tile(sK, k + kv_off, kvalid, d, dp, ld, row_stride);
        load_tile(sV, v + kv_off, kvalid, d, dp, ld, row_stride);
        __syncthreads();

        // S = Q_w K_tile^T  (16 x 64), f32 accumulate; each Q fragment is loaded once per tile.
        {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[ATT_BC / 16];
            for (int cb = 0; cb < ATT_BC / 16; ++cb) wmma::fill_fragment(acc[cb], 0.f);
            for (int kk = 0; kk < dp; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::load_matrix_sync(a, sQ + warp * 16 * ld + kk, ld);
                for (int cb = 0; cb < ATT_BC / 16; ++cb) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
                    wmma::load_matrix_sync(b, sK + cb * 16 * ld + kk, ld);
                    wmma::mma_sync(acc[cb], a, b, acc[cb]);
                }
            }
            for (int cb = 0; cb < ATT_BC / 16; ++cb)
                wmma::store_matrix_sync(wS + cb * 16, acc[cb], ATT_S_LD, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax on this lane's 32 columns of its row.
        float* srow = wS + row * ATT_S_LD + half_sel * 32;
        float tile_max = -INFINITY;
        for (int c = 0; c < 32; ++c) {
            int key = half_sel * 32 + c;
            float s = key < kvalid ? srow[c] * scale_log2 : -INFINITY;
            srow[c] = s;
            tile_max = fmaxf(tile_max, s);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 16));
        const float m_new = fmaxf(m_run, tile_max);
        const float alpha = (m_run == -INFINITY) ? 0.f : exp2f(m_run - m_new);
        float sum = 0.f;
        T* prow = wP + row * ATT_P_LD + half_sel * 32;
        for (int c = 0; c < 32; ++c) {
            float p = (srow[c] == -INFINITY) ? 0.f : exp2f(srow[c] - m_new);
            T pt = from_f32<T>(p);
            prow[c] = pt;
            sum += to_f32(pt);  // the weights the PV product will use, rounded alike
        }
        sum += __shfl_xor_sync(0xffffffff, sum, 16);
        l_run = l_run * alpha + sum;
        m_run = m_new;
        float* orow = wO + row * o_ld;
        const int half_cols = dp / 2;
        for (int c = half_sel * half_cols; c < (half_sel + 1) * half_cols; ++c) orow[c] *= alpha;
        __syncwarp();

        // O_w += P_w V_tile  (16 x dp), accumulating through shared memory; the P fragments
        // are loaded once per tile.
        {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[ATT_BC / 16];
            for (int kb = 0; kb < ATT_BC / 16; ++kb)
                wmma::load_matrix_sync(a[kb], wP + kb * 16, ATT_P_LD);
            for (int cb = 0; cb < dp / 16; ++cb) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
                wmma::load_matrix_sync(acc, wO + cb * 16, o_ld, wmma::mem_row_major);
                for (int kb = 0; kb < ATT_BC / 16; ++kb) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
                    wmma::load_matrix_sync(b, sV + kb * 16 * ld + cb * 16, ld);
                    wmma::mma_sync(acc, a[kb], b, acc);
                }
                wmma::store_matrix_sync(wO + cb * 16, acc, o_ld, wmma::mem_row_major);
            }
        }
        __syncwarp();
    }

    // out = O / l for this lane's half of the row.
    const int qrow = q0 + warp * 16 + row;
    if (qrow < n) {
        const float inv = l_run > 0.f ? 1.f / l_run : 0.f;
        const float* orow = wO + row * o_ld;
        T* dst = out + ((size_t)bi * n + qrow) * row_stride + hi * d;
        const int half_cols = (d + 1) / 2;
        const int c_end = min(d, (half_sel + 1) * half_cols);
        for (int c = half_sel * half_cols; c < c_end; ++c) dst[c] = from_f32<T>(orow[c] * inv);
    }
}

extern "C" __global__ void __launch_bounds__(128)
ss_attention_f16(const __half* q, const __half* k, const __half* v, __half* out, int n, int m,
                 int heads, int d, int dp, float scale_log2) {
    attention_impl<__half>(q, k, v, out, n, m, heads, d, dp, scale_log2);
}

extern "C" __global__ void __launch_bounds__(128)
ss_attention_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                  __nv_bfloat16* out, int n, int m, int heads, int d, int dp,
                  float scale_log2) {
    attention_impl<__nv_bfloat16>(q, k, v, out, n, m, heads, d, dp, scale_log2);
}

// ---------------------------------------------------------------------------------------------
// GroupNorm (+SiLU)
// ---------------------------------------------------------------------------------------------

#define GN_THREADS 256

struct Welford {
    float n, mean, m2;
};

__device__ __forceinline__ Welford welford_merge(Welford a, Welford b) {
    float n = a.n + b.n;
    if (n == 0.f) return a;
    float delta = b.mean - a.mean;
    float wb = b.n / n;
    Welford r;
    r.n = n;
    r.mean = a.mean + delta * wb;
    r.m2 = a.m2 + b.m2 + delta * delta * a.n * wb;
    return r;
}

__device__ __forceinline__ Welford warp_merge(Welford w) {
    for (int off = 16; off > 0; off >>= 1) {
        Welford o;
        o.n = __shfl_xor_sync(0xffffffff, w.n, off);
        o.mean = __shfl_xor_sync(0xffffffff, w.mean, off);
        o.m2 = __shfl_xor_sync(0xffffffff, w.m2, off);
        w = welford_merge(w, o);
    }
    return w;
}

// x: (groups_total, len) contiguous where groups_total = batch * groups and len = elements per
// group (below 2^31; the Rust side checks). grid = (chunks, groups_total); each block writes one Welford partial (n, mean, m2) for
// its chunk of its group into partials[(g * chunks + chunk) * 3 ..].
template <typename T>
__device__ void gn_stats_impl(const T* __restrict__ x, float* __restrict__ partials, int len,
                              int chunks) {
    const int g = blockIdx.y, chunk = blockIdx.x;
    const int per = (len + chunks - 1) / chunks;
    const int begin = chunk * per;
    const int end = min(len, begin + per);
    const T* src = x + (size_t)g * len;
    Welford w = {0.f, 0.f, 0.f};
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
        float v = to_f32(src[i]);
        w.n += 1.f;
        float delta = v - w.mean;
        w.mean += delta / w.n;
        w.m2 += delta * (v - w.mean);
    }
    w = warp_merge(w);
    __shared__ Welford per_warp[GN_THREADS / 32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) per_warp[warp] = w;
    __syncthreads();
    if (warp == 0) {
        w = lane < GN_THREADS / 32 ? per_warp[lane] : Welford{0.f, 0.f, 0.f};
        w = warp_merge(w);
        if (lane == 0) {
            float* p = partials + ((size_t)g * chunks + chunk) * 3;
            p[0] = w.n;
            p[1] = w.mean;
            p[2] = w.m2;
        }
    }
}

// out = affine((x - mean) * rstd) [then SiLU]; grid = (blocks_per_group, groups_total). The group
// `g` of the flattened (batch * groups) covers channels (g % groups) * cpg .. + cpg, each `spatial`
// elements long. weight/bias are per channel, in T.
template <typename T>
__device__ void gn_apply_impl(const T* __restrict__ x, const float* __restrict__ partials,
                              const T* __restrict__ weight, const T* __restrict__ bias,
                              T* __restrict__ out, int len, int chunks, int groups, int cpg,
                              int spatial, float eps, int silu) {
    const int g = blockIdx.y;
    __shared__ float stats[2];
    if (threadIdx.x < 32) {
        Welford w = {0.f, 0.f, 0.f};
        for (int c = threadIdx.x; c < chunks; c += 32) {
            const float* p = partials + ((size_t)g * chunks + c) * 3;
            w = welford_merge(w, Welford{p[0], p[1], p[2]});
        }
        w = warp_merge(w);
        if (threadIdx.x == 0) {
            stats[0] = w.mean;
            stats[1] = rsqrtf(w.m2 / w.n + eps);
        }
    }
    __syncthreads();
    const float mean = stats[0], rstd = stats[1];
    const int c0 = (g % groups) * cpg;
    const T* src = x + (size_t)g * len;
    T* dst = out + (size_t)g * len;
    const int stride = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        const int c = c0 + i / spatial;
        float y = (to_f32(src[i]) - mean) * rstd * to_f32(weight[c]) + to_f32(bias[c]);
        if (silu) y = y / (1.f + __expf(-y));
        dst[i] = from_f32<T>(y);
    }
}

#define GN_KERNELS(SUFFIX, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(GN_THREADS)                                     \
        ss_gn_stats_##SUFFIX(const T* x, float* partials, int len, int chunks) {          \
        gn_stats_impl<T>(x, partials, len, chunks);                                             \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(GN_THREADS) ss_gn_apply_##SUFFIX(              \
        const T* x, const float* partials, const T* weight, const T* bias, T* out,              \
        int len, int chunks, int groups, int cpg, int spatial, float eps, int silu) {           \
        gn_apply_impl<T>(x, partials, weight, bias, out, len, chunks, groups, cpg, spatial, eps, \
                         silu);                                                                  \
    }

GN_KERNELS(f16, __half)
GN_KERNELS(bf16, __nv_bfloat16)
GN_KERNELS(f32, float)
