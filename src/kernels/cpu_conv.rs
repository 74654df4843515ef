//! The CPU's 3×3 stride-1 "same" convolution (f32). Small maps (under [`MIN_WINOGRAD_PIXELS`]
//! pixels) take one matrix product of the weight, as stored, with an im2col
//! matrix built by row copies. Larger ones take Winograd's minimal filtering F(2×2, 3×3) (Lavin &
//! Gray, arXiv 1509.09308): each 2×2 block of outputs is 16 multiplies per channel pair instead of
//! 36, so the matrix products that dominate a convolution do 2.25× fewer flops. The transforms
//! use only additions and halvings, so the f32 error stays near the direct convolution's
//! (`winograd_error_stays_near_the_direct_convolution` measures it on fresh random inputs).
//!
//! Layout: per batch item and per band of tile rows, the input transform writes
//! `V[16][cin][tiles]`, sixteen matrix products give `M[k] = U[k] · V[k]` with the transformed
//! weights `U[16][cout][cin]`, and the output transform writes the NCHW output directly. Bands
//! bound the scratch buffers; the weights are transformed at each call (a few % of the products
//! at the smallest maps where this path is used) so no second copy of every weight stays resident.

use candle_core::{Device, Layout, Result, Storage, Tensor};

use super::cpu::{product, Operand};
use rayon::prelude::*;

/// Smallest map (`h·w`) that takes the Winograd path. Below it the weight transform (about 100
/// bytes of memory traffic per channel pair) costs more than the 10 flops per pair and pixel that
/// Winograd saves, so those maps take the direct product. The choice is per map, never per batch:
/// a batch row must get the same bits whoever shares its UNet call.
pub const MIN_WINOGRAD_PIXELS: usize = 256;

/// Largest scratch buffer (bytes) of one band's transformed input or products (2, 8 and 32 MB
/// timed within noise of each other on a 2-core CPU; this bounds the memory the scratch keeps).
const MAX_BAND_BYTES: usize = 32 << 20;

/// Whether `x` takes this module's convolution: f32 on the CPU.
pub fn applies(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == candle_core::DType::F32
}

/// `U[k][o][c] = (G g Gᵀ)[k]` for `weight: (cout, cin, 3, 3)`, written into `u` (`16·cout·cin`).
fn transform_weights(weight: &[f32], pairs: usize, u: &mut [f32]) {
    let u_addr = u.as_mut_ptr() as usize;
    weight.par_chunks(9).enumerate().for_each(|(p, g)| {
        // t = G g (4×3)
        let mut t = [[0f32; 3]; 4];
        for j in 0..3 {
            let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
            t[0][j] = g0;
            t[1][j] = 0.5 * (g0 + g1 + g2);
            t[2][j] = 0.5 * (g0 - g1 + g2);
            t[3][j] = g2;
        }
        // SAFETY: pair `p` writes only `U[k][p]`, which no other pair writes, and `u` outlives
        // the parallel loop.
        let u = unsafe { std::slice::from_raw_parts_mut(u_addr as *mut f32, 16 * pairs) };
        // U = t Gᵀ (4×4)
        for (i, row) in t.iter().enumerate() {
            let (a, b, c) = (row[0], row[1], row[2]);
            u[(i * 4) * pairs + p] = a;
            u[(i * 4 + 1) * pairs + p] = 0.5 * (a + b + c);
            u[(i * 4 + 2) * pairs + p] = 0.5 * (a - b + c);
            u[(i * 4 + 3) * pairs + p] = c;
        }
    });
}

/// Buffers kept between calls: the transformed weights and one band's transformed input and
/// products, each fully overwritten before it is read. Reusing them spares the page faults of
/// tens of MB of fresh memory at every convolution (a quarter of a VAE decode's time when each
/// call allocated them).
#[derive(Default)]
struct Scratch {
    u: Vec<f32>,
    v: Vec<f32>,
    m: Vec<f32>,
}

thread_local! {
    /// One per thread: a device's convolutions run on its one engine thread.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// `buf` grown to at least `n` values (never shrunk); its first `n`.
fn at_least(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// The f32 contents of a contiguous CPU tensor.
fn cpu_slice<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    super::cpu::f32_slice(storage, layout, "3x3 convolution")
}

/// Convolves `x: (b, cin, h, w)` with `weight: (cout, cin, 3, 3)`, padding 1, stride 1, plus
/// `bias`.
pub fn conv3x3(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let (_, cin, h, w) = x.dims4()?;
    let (cout, wcin, kh, kw) = weight.dims4()?;
    if (wcin, kh, kw) != (cin, 3, 3) {
        candle_core::bail!(
            "winograd: weight {:?} does not fit input {:?}",
            weight.dims(),
            x.dims()
        );
    }
    let bias: Vec<f32> = match bias {
        Some(bias) => bias.to_vec1()?,
        None => vec![0.0; cout],
    };
    if h * w < MIN_WINOGRAD_PIXELS {
        return direct(&x, &weight, &bias);
    }
    SCRATCH.with_borrow_mut(|scratch| {
        let u = at_least(&mut scratch.u, 16 * cout * cin);
        {
            let (storage, layout) = weight.storage_and_layout();
            transform_weights(cpu_slice(&storage, layout)?, cout * cin, u);
        }
        convolve(&x, u, &bias, &mut scratch.v, &mut scratch.m)
    })
}

/// The convolution as `out[b] = W · col[b]`: the weight as stored (`cout × cin·9`) times the
/// im2col matrix (`cin·9 × h·w`, its rows shifted copies of the input rows, zeros at the edges).
fn direct(x: &Tensor, weight: &Tensor, bias: &[f32]) -> Result<Tensor> {
    let (b, cin, h, w) = x.dims4()?;
    let cout = bias.len();
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = weight.storage_and_layout();
    let (input, kernel) = (cpu_slice(&xs, xl)?, cpu_slice(&ws, wl)?);
    let plane = h * w;
    let mut out: Vec<f32> = bias
        .iter()
        .flat_map(|&v| std::iter::repeat_n(v, plane))
        .collect::<Vec<_>>()
        .repeat(b);
    let mut col = vec![0f32; cin * 9 * plane];
    for item in 0..b {
        let src = &input[item * cin * plane..(item + 1) * cin * plane];
        col.par_chunks_mut(9 * plane)
            .enumerate()
            .for_each(|(c, rows)| {
                let chan = &src[c * plane..(c + 1) * plane];
                for (tap, row) in rows.chunks_mut(plane).enumerate() {
                    let (dy, dx) = (tap / 3, tap % 3);
                    for y in 0..h {
                        let dst = &mut row[y * w..(y + 1) * w];
                        let sy = y + dy;
                        if sy == 0 || sy > h {
                            dst.fill(0.0);
                            continue;
                        }
                        let srow = &chan[(sy - 1) * w..sy * w];
                        // dst[x] = srow[x + dx - 1], zero where that leaves the row.
                        match dx {
                            0 => {
                                dst[0] = 0.0;
                                dst[1..].copy_from_slice(&srow[..w - 1]);
                            }
                            1 => dst.copy_from_slice(srow),
                            _ => {
                                dst[..w - 1].copy_from_slice(&srow[1..]);
                                dst[w - 1] = 0.0;
                            }
                        }
                    }
                }
            });
        let dst = &mut out[item * cout * plane..(item + 1) * cout * plane];
        // SAFETY: row-major `cout × cin·9`, `cin·9 × plane` and `cout × plane` buffers of exactly
        // those sizes.
        unsafe {
            product(
                (cout, plane, cin * 9),
                dst.as_mut_ptr(),
                plane,
                Operand {
                    ptr: kernel.as_ptr(),
                    row_stride: cin * 9,
                    col_stride: 1,
                },
                Operand {
                    ptr: col.as_ptr(),
                    row_stride: plane,
                    col_stride: 1,
                },
                1.0,
                true,
                rayon::current_num_threads(),
            );
        }
    }
    drop((xs, ws));
    Tensor::from_vec(out, (b, cout, h, w), &Device::Cpu)
}

/// The convolution of `x` by the transformed weights `u`, plus `bias`, band by band.
fn convolve(
    x: &Tensor,
    u: &[f32],
    bias: &[f32],
    v: &mut Vec<f32>,
    m: &mut Vec<f32>,
) -> Result<Tensor> {
    let (b, cin, h, w) = x.dims4()?;
    let cout = bias.len();
    let (storage, layout) = x.storage_and_layout();
    let input = cpu_slice(&storage, layout)?;
    let mut out = vec![0f32; b * cout * h * w];
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let per_tile_row = 16 * tw * cin.max(cout) * 4;
    let band_rows = (MAX_BAND_BYTES / per_tile_row).clamp(1, th);
    let v = at_least(v, 16 * cin * band_rows * tw);
    let m = at_least(m, 16 * cout * band_rows * tw);
    for item in 0..b {
        let src = &input[item * cin * h * w..(item + 1) * cin * h * w];
        let dst = &mut out[item * cout * h * w..(item + 1) * cout * h * w];
        let mut r0 = 0;
        while r0 < th {
            let rows = band_rows.min(th - r0);
            let tiles = rows * tw;
            input_transform(src, h, w, cin, r0, rows, tw, &mut v[..16 * cin * tiles]);
            products(
                u,
                &v[..16 * cin * tiles],
                &mut m[..16 * cout * tiles],
                cout,
                cin,
                tiles,
            );
            output_transform(&m[..16 * cout * tiles], bias, dst, h, w, r0, rows, tw);
            r0 += rows;
        }
    }
    drop(storage);
    Tensor::from_vec(out, (b, cout, h, w), &Device::Cpu)
}

/// `V[k][c][tile] = (Bᵀ d B)[k]` for the 4×4 input patch `d` of each tile in tile rows
/// `r0..r0 + rows` (zeros outside the image: the padding).
///
/// Vectorised over the tiles of a row: each padded input row is split into its even and odd
/// columns, so a tile's four columns are `even[tx]`, `odd[tx]`, `even[tx + 1]`, `odd[tx + 1]` and
/// every step below is an element-wise operation on contiguous slices, as is every store (one
/// contiguous run of `tw` tiles per position `k`).
#[allow(clippy::too_many_arguments)]
fn input_transform(
    src: &[f32],
    h: usize,
    w: usize,
    cin: usize,
    r0: usize,
    rows: usize,
    tw: usize,
    v: &mut [f32],
) {
    let tiles = rows * tw;
    let plane = cin * tiles;
    let v_addr = v.as_mut_ptr() as usize;
    // Per padded row: its even columns then its odd columns, `tw + 1` each.
    let half = tw + 1;
    let padded_rows = 2 * rows + 2;
    (0..cin).into_par_iter().for_each_init(
        || (vec![0f32; padded_rows * 2 * half], vec![0f32; 8 * half]),
        |(split, t), c| {
            let chan = &src[c * h * w..(c + 1) * h * w];
            for pr in 0..padded_rows {
                let (even, odd) = split[pr * 2 * half..(pr + 1) * 2 * half].split_at_mut(half);
                even.fill(0.0);
                odd.fill(0.0);
                let y = (2 * r0 + pr) as isize - 1;
                if y < 0 || y >= h as isize {
                    continue;
                }
                let row = &chan[y as usize * w..(y as usize + 1) * w];
                // Padded column j holds row[j - 1]: odd j from even x, even j from odd x.
                for (o, &val) in odd.iter_mut().zip(row.iter().step_by(2)) {
                    *o = val;
                }
                for (e, &val) in even[1..].iter_mut().zip(row.iter().skip(1).step_by(2)) {
                    *e = val;
                }
            }
            // SAFETY: channel `c` writes only the indices `k * plane + c * tiles + t`, which no
            // other channel writes, and `v` outlives the parallel loop.
            let v = unsafe { std::slice::from_raw_parts_mut(v_addr as *mut f32, 16 * plane) };
            for tr in 0..rows {
                let row = |i: usize| {
                    let at = (2 * tr + i) * 2 * half;
                    (&split[at..at + half], &split[at + half..at + 2 * half])
                };
                let ((e0, o0), (e1, o1), (e2, o2), (e3, o3)) = (row(0), row(1), row(2), row(3));
                // t = Bᵀ d on the even and the odd columns: t[i] even in te(i), odd in to(i).
                for (part, (a, b, c2, d)) in [(0, (e0, e1, e2, e3)), (1, (o0, o1, o2, o3))] {
                    let base = part * 4 * half;
                    let (t0, rest) = t[base..base + 4 * half].split_at_mut(half);
                    let (t1, rest) = rest.split_at_mut(half);
                    let (t2, t3) = rest.split_at_mut(half);
                    for x in 0..half {
                        t0[x] = a[x] - c2[x];
                        t1[x] = b[x] + c2[x];
                        t2[x] = c2[x] - b[x];
                        t3[x] = b[x] - d[x];
                    }
                }
                let at = c * tiles + tr * tw;
                for i in 0..4 {
                    let te = &t[i * half..(i + 1) * half];
                    let to = &t[(4 + i) * half..(5 + i) * half];
                    let out = |k: usize| k * plane + at;
                    let (k0, k1, k2, k3) =
                        (out(4 * i), out(4 * i + 1), out(4 * i + 2), out(4 * i + 3));
                    for tx in 0..tw {
                        v[k0 + tx] = te[tx] - te[tx + 1];
                        v[k1 + tx] = to[tx] + te[tx + 1];
                        v[k2 + tx] = te[tx + 1] - to[tx];
                        v[k3 + tx] = to[tx] - to[tx + 1];
                    }
                }
            }
        },
    );
}

/// `M[k] = U[k] · V[k]` for the sixteen positions, one single-threaded product per task so the
/// cores split the sixteen instead of synchronising inside each.
fn products(u: &[f32], v: &[f32], m: &mut [f32], cout: usize, cin: usize, tiles: usize) {
    m.par_chunks_mut(cout * tiles)
        .enumerate()
        .for_each(|(k, mk)| {
            let uk = &u[k * cout * cin..(k + 1) * cout * cin];
            let vk = &v[k * cin * tiles..(k + 1) * cin * tiles];
            // SAFETY: the three buffers have the sizes given with these strides (row-major
            // `cout×cin`, `cin×tiles`, `cout×tiles`), and `mk` is this task's alone.
            unsafe {
                product(
                    (cout, tiles, cin),
                    mk.as_mut_ptr(),
                    tiles,
                    Operand {
                        ptr: uk.as_ptr(),
                        row_stride: cin,
                        col_stride: 1,
                    },
                    Operand {
                        ptr: vk.as_ptr(),
                        row_stride: tiles,
                        col_stride: 1,
                    },
                    1.0,
                    false,
                    1,
                );
            }
        });
}

/// `out[o][2ty + i][2tx + j] = (Aᵀ M A)[i][j] + bias[o]` for the tiles of this band (the rows and
/// columns past the image's edge are dropped). Vectorised over a row's tiles, as the input
/// transform: each `M[k]` row is contiguous, and the even and odd output columns are computed
/// apart, then interleaved.
#[allow(clippy::too_many_arguments)]
fn output_transform(
    m: &[f32],
    bias: &[f32],
    dst: &mut [f32],
    h: usize,
    w: usize,
    r0: usize,
    rows: usize,
    tw: usize,
) {
    let tiles = rows * tw;
    let cout = bias.len();
    let plane = cout * tiles;
    dst.par_chunks_mut(h * w).enumerate().for_each_init(
        || vec![0f32; 8 * tw],
        |s, (o, chan)| {
            for tr in 0..rows {
                let at = o * tiles + tr * tw;
                let mk = |k: usize| &m[k * plane + at..k * plane + at + tw];
                // s = Aᵀ M: s[i][j] for i in 0..2, j in 0..4, each a run of `tw` tiles.
                for j in 0..4 {
                    let (a, b, c, d) = (mk(j), mk(4 + j), mk(8 + j), mk(12 + j));
                    let (s0, s1) = s[2 * j * tw..(2 * j + 2) * tw].split_at_mut(tw);
                    for x in 0..tw {
                        s0[x] = a[x] + b[x] + c[x];
                        s1[x] = b[x] - c[x] - d[x];
                    }
                }
                let sij = |i: usize, j: usize| &s[(2 * j + i) * tw..(2 * j + i + 1) * tw];
                for i in 0..2 {
                    let y = 2 * (r0 + tr) + i;
                    if y >= h {
                        break;
                    }
                    let (a, b, c, d) = (sij(i, 0), sij(i, 1), sij(i, 2), sij(i, 3));
                    let row = &mut chan[y * w..(y + 1) * w];
                    let bo = bias[o];
                    for (x, pair) in row.chunks_mut(2).enumerate() {
                        pair[0] = a[x] + b[x] + c[x] + bo;
                        if let Some(odd) = pair.get_mut(1) {
                            *odd = b[x] - c[x] - d[x] + bo;
                        }
                    }
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// max |a - r| / max |r|.
    fn rel_err(a: &Tensor, r: &Tensor) -> f64 {
        let d = (a - r).unwrap().abs().unwrap().max_all().unwrap();
        let m = r.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f64>().unwrap() / m.to_scalar::<f64>().unwrap()
    }

    /// Seeded standard-normal values times `std`, as an f64 tensor of `shape`.
    fn randn(rng: &mut crate::rng::NoiseGenerator, std: f64, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f64> = rng.randn_vec(n).iter().map(|&z| z as f64 * std).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// This module's and candle's f32 errors against an f64 convolution of the same (seeded)
    /// inputs: the direct product on small maps, Winograd on the others; odd and even maps, few
    /// and many channels, with and without bias.
    #[test]
    fn the_cpu_convolution_error_stays_near_candles() {
        let rng = &mut crate::rng::NoiseGenerator::new(11);
        for (b, cin, cout, h, w, bias) in [
            (2, 3, 5, 7, 9, true),
            (2, 1280, 32, 4, 4, true),
            (1, 640, 16, 8, 8, false),
            (1, 4, 4, 1, 5, true),
            (1, 16, 8, 17, 23, false),
            (2, 64, 32, 32, 32, true),
            (1, 512, 64, 16, 16, true),
            (1, 1280, 16, 16, 16, false),
        ] {
            let x = randn(rng, 1.0, &[b, cin, h, w]);
            let k = randn(rng, 0.05, &[cout, cin, 3, 3]);
            let bias = bias.then(|| randn(rng, 1.0, &[cout]));
            let mut exact = x.conv2d(&k, 1, 1, 1, 1).unwrap();
            if let Some(bias) = &bias {
                exact = exact
                    .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                    .unwrap();
            }
            let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let (x32, k32, b32) = (f32s(&x), f32s(&k), bias.as_ref().map(f32s));
            let mut direct = x32.conv2d(&k32, 1, 1, 1, 1).unwrap();
            if let Some(bias) = &b32 {
                direct = direct
                    .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                    .unwrap();
            }
            let fast = conv3x3(&x32, &k32, b32.as_ref()).unwrap();
            assert_eq!(fast.dims(), exact.dims());
            let direct_err = rel_err(&direct.to_dtype(DType::F64).unwrap(), &exact);
            let fast_err = rel_err(&fast.to_dtype(DType::F64).unwrap(), &exact);
            let path = if h * w < MIN_WINOGRAD_PIXELS {
                "direct"
            } else {
                "winograd"
            };
            println!("{b}x{cin}x{h}x{w} -> {cout}: candle {direct_err:.2e}, {path} {fast_err:.2e}");
            // Within a small factor of the direct f32 convolution (the transformed values are
            // sums of up to 16 inputs, so more channels add more rounding), and far inside the
            // golden tests' 1e-5.
            assert!(
                fast_err <= 4.0 * direct_err + 1e-7,
                "{fast_err} vs {direct_err}"
            );
            assert!(fast_err < 2e-6, "{fast_err}");
        }
    }
}
