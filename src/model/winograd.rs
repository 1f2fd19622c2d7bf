//! 3x3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(2x2x2, 3x3x3) on CPUs with AVX2 and
//! FMA (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 2x2x2 block of outputs is computed from a 4x4x4 block of inputs transformed once per input channel: 64
//! multiplications per channel pair instead of 216, i.e. 3.4x fewer. The products are a matrix product per
//! transformed position; input and output transforms take only additions. Results differ from a direct
//! convolution by rounding alone (about 3e-7 relative here: tests below); they are not libtorch's bit for bit, so
//! the path is a choice of the request (`cpu_convolution`), recorded in its identity.
//!
//! Two layouts batch the tiles for the products ([`Layout`]): rows of tiles, eight consecutive tiles along x per
//! vector, for volumes at least 16 wide; every tile of the volume at once below that (VISTA3D's 8^3 level), where
//! a vector along x would be mostly padding and the filters would be read once per row.
//!
//! The switch is per thread ([`enable`]), like libtorch's thread count and grad mode: a request turns it on
//! for the threads that run its windows, and everything else (training, export, other requests) keeps
//! libtorch's kernels. The same switch takes the fused instance norm ([`super::fused_norm`]): it is the
//! switch for vista3d's own CPU kernels.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use super::openmp::{for_each_share, SharedPtr};

use tch::{Device, Kind, Tensor};

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
}

/// Whether 3x3x3 convolutions on this thread take the Winograd path where they can.
pub fn enabled() -> bool {
    ENABLED.with(Cell::get)
}

/// Turns the Winograd path on or off for this thread until the guard drops (then back to what it was).
pub fn enable(on: bool) -> EnabledGuard {
    let previous = ENABLED.with(|e| e.replace(on));
    EnabledGuard { previous }
}

/// Restores this thread's previous setting when dropped (see [`enable`]).
#[must_use]
pub struct EnabledGuard {
    previous: bool,
}

impl Drop for EnabledGuard {
    fn drop(&mut self) {
        ENABLED.with(|e| e.set(self.previous));
    }
}

/// Whether this CPU can run the path (x86-64 with AVX2 and FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The smallest spatial size (each of D, H, W) that takes the path: below it libtorch's convolution is as fast
/// (VISTA3D's deepest level, 4^3, stays with libtorch).
pub const MIN_SIZE: i64 = 8;

/// Below this width (W) the tiles of the whole volume are transformed at once and each of the 64 products is one
/// matrix product over all of them ([`Layout::AllTiles`]): a vector of eight tiles along x would be mostly padding,
/// and the transformed filters, large next to such a volume, are read once instead of once per row of tiles.
const ALL_TILES_BELOW: usize = 16;

/// How a convolution's tiles are batched for the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// One row of tiles (fixed z and y) at a time, eight consecutive tiles along x per vector.
    Rows,
    /// Every tile of the volume at once, eight tiles in x-fastest order per vector.
    AllTiles,
}

/// One convolution's filters for the Winograd path, transformed on first use and again whenever the weights
/// change (they are compared with the copy the transform was made from: cheap next to the convolution).
#[derive(Debug, Default)]
pub struct Filters {
    cache: Mutex<Option<(Vec<f32>, Arc<TransformedWeights>)>>,
}

impl Filters {
    /// `input` `[N, Cin, D, H, W]` convolved with `weight` `[Cout, Cin, 3, 3, 3]` (stride 1, padding 1, no bias)
    /// by Winograd, or `None` where the path does not apply (not enabled on this thread, CPU without AVX2/FMA, not
    /// a float32 CPU tensor, `Cout` not a multiple of 8, a side under [`MIN_SIZE`]): the caller then runs
    /// libtorch's convolution.
    pub fn conv3x3(&self, input: &Tensor, weight: &Tensor) -> Option<Tensor> {
        if !enabled() || !available() {
            return None;
        }
        let on_cpu_f32 = |t: &Tensor| t.device() == Device::Cpu && t.kind() == Kind::Float;
        let (size, wsize) = (input.size(), weight.size());
        let [n, cin, d, h, w] = size[..] else {
            return None;
        };
        let [cout, wcin, 3, 3, 3] = wsize[..] else {
            return None;
        };
        if !on_cpu_f32(input)
            || !on_cpu_f32(weight)
            || wcin != cin
            || cout % 8 != 0
            || d.min(h).min(w) < MIN_SIZE
            || input.requires_grad()
        {
            return None;
        }
        let transformed = self.transformed(weight, cout as usize, cin as usize)?;
        let input = input.contiguous();
        let out = Tensor::empty([n, cout, d, h, w], (Kind::Float, Device::Cpu));
        let dims = [d as usize, h as usize, w as usize];
        let (per_in, per_out) = ((cin * d * h * w) as usize, (cout * d * h * w) as usize);
        let threads = tch::get_num_threads().max(1) as usize;
        for i in 0..n as usize {
            // SAFETY: `input` is a contiguous float32 CPU tensor of `n * per_in` elements and `out` a fresh one of
            // `n * per_out`; both stay alive (and `out` unshared) for the borrow, and the slices do not overlap.
            let (x, y) = unsafe {
                (
                    std::slice::from_raw_parts(
                        (input.data_ptr() as *const f32).add(i * per_in),
                        per_in,
                    ),
                    std::slice::from_raw_parts_mut(
                        (out.data_ptr() as *mut f32).add(i * per_out),
                        per_out,
                    ),
                )
            };
            convolve(x, dims, &transformed, y, threads);
        }
        Some(out)
    }

    /// The transformed filters of `weight`, from the cache while the weights are the ones it was made from.
    fn transformed(
        &self,
        weight: &Tensor,
        cout: usize,
        cin: usize,
    ) -> Option<Arc<TransformedWeights>> {
        let weight = weight.contiguous();
        let len = cout * cin * 27;
        if weight.numel() != len {
            return None;
        }
        // SAFETY: `conv3x3` checked that `weight` is a float32 CPU tensor of `[cout, cin, 3, 3, 3]`; the
        // contiguous copy holds `len` elements and outlives the slice.
        let raw = unsafe { std::slice::from_raw_parts(weight.data_ptr() as *const f32, len) };
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((from, transformed)) = cache.as_ref() {
            // Compared bit for bit (a memcmp, unlike f32's element-wise `==`, which is also never true for NaN).
            if as_bits(from) == as_bits(raw) {
                return Some(Arc::clone(transformed));
            }
        }
        let transformed = Arc::new(TransformedWeights::new(raw, cout, cin));
        *cache = Some((raw.to_vec(), Arc::clone(&transformed)));
        Some(transformed)
    }
}

/// The bits of `values`, to compare floats as memory.
fn as_bits(values: &[f32]) -> &[u32] {
    // SAFETY: f32 and u32 have the same size and alignment, and every bit pattern is a valid u32.
    unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u32, values.len()) }
}

/// Filters transformed (`G g G^T` along each axis), `[64][cin][cout]`.
#[derive(Debug)]
struct TransformedWeights {
    cin: usize,
    cout: usize,
    u: Vec<f32>,
}

impl TransformedWeights {
    /// `w` `[cout][cin][3][3][3]`; transformed in float64 and rounded once.
    fn new(w: &[f32], cout: usize, cin: usize) -> Self {
        let rows = |a: f64, b: f64, c: f64| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
        let mut u = vec![0f32; 64 * cin * cout];
        for co in 0..cout {
            for ci in 0..cin {
                let g = &w[(co * cin + ci) * 27..][..27];
                let g = |i: usize, j: usize, l: usize| f64::from(g[i * 9 + j * 3 + l]);
                let mut along_x = [[[0f64; 4]; 3]; 3];
                for (i, plane) in along_x.iter_mut().enumerate() {
                    for (j, line) in plane.iter_mut().enumerate() {
                        *line = rows(g(i, j, 0), g(i, j, 1), g(i, j, 2));
                    }
                }
                let mut along_y = [[[0f64; 4]; 4]; 3];
                for i in 0..3 {
                    for l in 0..4 {
                        let r = rows(along_x[i][0][l], along_x[i][1][l], along_x[i][2][l]);
                        for j in 0..4 {
                            along_y[i][j][l] = r[j];
                        }
                    }
                }
                for j in 0..4 {
                    for l in 0..4 {
                        let r = rows(along_y[0][j][l], along_y[1][j][l], along_y[2][j][l]);
                        for (i, value) in r.iter().enumerate() {
                            u[((i * 4 + j) * 4 + l) * cin * cout + ci * cout + co] = *value as f32;
                        }
                    }
                }
            }
        }
        Self { cin, cout, u }
    }
}

/// Sizes of one convolution: output `d x h x w`, tiles of 2, eight tiles per vector along x, the zero-padded
/// copy of the input `[cin][zp][yp][xp]`.
struct Geometry {
    d: usize,
    h: usize,
    w: usize,
    tiles_y: usize,
    vectors_x: usize,
    zp: usize,
    yp: usize,
    xp: usize,
}

/// `out` `[cout][d][h][w]` from `x` `[cin][d][h][w]` on `threads` threads, in the layout that suits the size.
fn convolve(
    x: &[f32],
    dims: [usize; 3],
    weights: &TransformedWeights,
    out: &mut [f32],
    threads: usize,
) {
    let layout = if dims[2] < ALL_TILES_BELOW {
        Layout::AllTiles
    } else {
        Layout::Rows
    };
    convolve_as(x, dims, weights, out, threads, layout);
}

/// [`convolve`] in the given layout.
fn convolve_as(
    x: &[f32],
    dims: [usize; 3],
    weights: &TransformedWeights,
    out: &mut [f32],
    threads: usize,
    layout: Layout,
) {
    let [d, h, w] = dims;
    let (tiles_z, tiles_y, vectors_x) = (d.div_ceil(2), h.div_ceil(2), w.div_ceil(16));
    let g = Geometry {
        d,
        h,
        w,
        tiles_y,
        vectors_x,
        zp: 2 * tiles_z + 2,
        yp: 2 * tiles_y + 2,
        xp: 16 * vectors_x + 2,
    };
    // Zero-padded copy (one voxel before, the tiles' extent after), so that tiles never test bounds. Every element
    // is written once by the threads, borders included: no serial memset of the whole buffer first.
    let len = weights.cin * g.zp * g.yp * g.xp;
    let mut padded: Vec<f32> = Vec::with_capacity(len);
    let zero = MaybeUninit::new(0f32);
    let planes: Vec<(usize, &mut [MaybeUninit<f32>])> = padded.spare_capacity_mut()[..len]
        .chunks_mut(g.yp * g.xp)
        .enumerate()
        .collect();
    for_each_share(planes, threads, |(index, plane)| {
        let (c, zp) = (index / g.zp, index % g.zp);
        if zp == 0 || zp > d {
            plane.fill(zero);
            return;
        }
        for (yp, row) in plane.chunks_mut(g.xp).enumerate() {
            if yp == 0 || yp > h {
                row.fill(zero);
                continue;
            }
            let from = &x[((c * d + zp - 1) * h + yp - 1) * w..][..w];
            row[0] = zero;
            for (to, &value) in row[1..=w].iter_mut().zip(from) {
                *to = MaybeUninit::new(value);
            }
            row[w + 1..].fill(zero);
        }
    });
    // SAFETY: the planes cover the first `len` elements and each was written above.
    unsafe { padded.set_len(len) };
    let out = SharedPtr(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    match layout {
        Layout::Rows => by_rows(&padded, &g, weights, &out, threads, tiles_z * tiles_y),
        Layout::AllTiles => all_tiles(&padded, &g, weights, &out, threads),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (&out, layout);
        unreachable!("the Winograd path runs only where available() is true")
    }
}

/// [`Layout::Rows`]: the rows of tiles split among the threads, each transforming, multiplying and writing back
/// its own rows.
#[cfg(target_arch = "x86_64")]
fn by_rows(
    padded: &[f32],
    g: &Geometry,
    weights: &TransformedWeights,
    out: &SharedPtr,
    threads: usize,
    rows: usize,
) {
    let per = rows.div_ceil(threads.max(1));
    let shares: Vec<std::ops::Range<usize>> = (0..rows)
        .step_by(per.max(1))
        .map(|s| s..(s + per).min(rows))
        .collect();
    for_each_share(shares, threads, |range| {
        // SAFETY: `available()` was checked by the caller; each row of tiles writes only its own output rows
        // (z in 2 tz..2 tz+2, y in 2 ty..2 ty+2), so the shares never write the same element.
        unsafe { avx2::rows(padded, g, weights, range, out.ptr()) }
    });
}

/// [`Layout::AllTiles`] in three steps, each split among the threads: the input transform by input channel, the
/// 64 products by position, the output transform by output channel.
#[cfg(target_arch = "x86_64")]
fn all_tiles(
    padded: &[f32],
    g: &Geometry,
    weights: &TransformedWeights,
    out: &SharedPtr,
    threads: usize,
) {
    let (cin, cout) = (weights.cin, weights.cout);
    let tiles = g.d.div_ceil(2) * g.tiles_y * g.w.div_ceil(2);
    let vectors = tiles.div_ceil(8);
    // Transformed inputs [64][cin][8 * vectors] and products [64][cout][8 * vectors], each position's stride padded
    // by a cache line (as in `avx2::rows`). Every element that is read was written first.
    let (v_stride, m_stride) = (cin * 8 * vectors + 16, cout * 8 * vectors + 16);
    let mut v = Scratch::new(64 * v_stride);
    let mut m = Scratch::new(64 * m_stride);
    let (vp, mp) = (SharedPtr(v.ptr()), SharedPtr(m.ptr()));
    // SAFETY (the three steps): `available()` was checked by the caller; each input channel writes only its own
    // rows of `v`, each position only its own block of `m`, each output channel only its own part of `out`; each
    // step reads only what the step before wrote, and `for_each_share` returns when every share is done.
    for_each_share((0..cin).collect(), threads, |ci| unsafe {
        avx2::input_tiles(padded, g, ci, vectors, vp.ptr(), v_stride)
    });
    for_each_share((0..64).collect(), threads, |k| unsafe {
        avx2::products(
            vp.ptr().add(k * v_stride),
            weights.u.as_ptr().add(k * cin * cout),
            mp.ptr().add(k * m_stride),
            cin,
            cout,
            vectors,
        )
    });
    for_each_share((0..cout).collect(), threads, |co| unsafe {
        avx2::output_tiles(mp.ptr(), m_stride, g, co, vectors, out.ptr())
    });
    drop((v, m));
}

/// A buffer of floats that is written before it is read, so never zeroed.
struct Scratch(Vec<MaybeUninit<f32>>);

impl Scratch {
    fn new(len: usize) -> Self {
        let mut buffer = Vec::with_capacity(len);
        // SAFETY: `MaybeUninit` needs no initialisation.
        unsafe { buffer.set_len(len) };
        Self(buffer)
    }

    fn ptr(&mut self) -> *mut f32 {
        self.0.as_mut_ptr() as *mut f32
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Geometry, Scratch, TransformedWeights};

    /// Even and odd elements of the 16 floats `a, b`, each in order.
    #[inline(always)]
    unsafe fn deinterleave(a: __m256, b: __m256) -> (__m256, __m256) {
        let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
        let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
        let order = |v: __m256| {
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
        };
        (order(even), order(odd))
    }

    /// `B^T d` of four vectors.
    #[inline(always)]
    unsafe fn input_1d(d: [__m256; 4]) -> [__m256; 4] {
        [
            _mm256_sub_ps(d[0], d[2]),
            _mm256_add_ps(d[1], d[2]),
            _mm256_sub_ps(d[2], d[1]),
            _mm256_sub_ps(d[1], d[3]),
        ]
    }

    /// `A^T m` of four vectors.
    #[inline(always)]
    unsafe fn output_1d(m: [__m256; 4]) -> [__m256; 2] {
        [
            _mm256_add_ps(_mm256_add_ps(m[0], m[1]), m[2]),
            _mm256_sub_ps(_mm256_sub_ps(m[1], m[2]), m[3]),
        ]
    }

    /// Convolves the rows of tiles `rows` (row = tz * tiles_y + ty) of `padded` into `out`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `padded` and `out` have the sizes `g` and `weights` give; no other thread writes
    /// the output rows of these tiles.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // positions are computed from the indices, as in the paper's notation
    pub(super) unsafe fn rows(
        padded: &[f32],
        g: &Geometry,
        weights: &TransformedWeights,
        rows: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        let (cin, cout, vectors) = (weights.cin, weights.cout, g.vectors_x);
        let tiles = 8 * vectors;
        // Transformed inputs [64][cin][tiles] and products [64][cout][tiles] of one row of tiles; each position's
        // stride is padded by a cache line, so that the 64 positions do not crowd into a few cache sets.
        let (v_stride, m_stride) = (cin * tiles + 16, cout * tiles + 16);
        let (mut v_buffer, mut m_buffer) =
            (Scratch::new(64 * v_stride), Scratch::new(64 * m_stride));
        let (v, m) = (v_buffer.ptr(), m_buffer.ptr());
        let (plane, channel) = (g.yp * g.xp, g.zp * g.yp * g.xp);
        for row in rows {
            let (tz, ty) = (row / g.tiles_y, row % g.tiles_y);
            for ci in 0..cin {
                for tv in 0..vectors {
                    let mut b = [_mm256_setzero_ps(); 64];
                    for i in 0..4 {
                        for j in 0..4 {
                            let q = padded.as_ptr().add(
                                ci * channel + (2 * tz + i) * plane + (2 * ty + j) * g.xp + 16 * tv,
                            );
                            let (d0, d1) =
                                deinterleave(_mm256_loadu_ps(q), _mm256_loadu_ps(q.add(8)));
                            let (d2, d3) =
                                deinterleave(_mm256_loadu_ps(q.add(2)), _mm256_loadu_ps(q.add(10)));
                            let k = (i * 4 + j) * 4;
                            b[k..k + 4].copy_from_slice(&input_1d([d0, d1, d2, d3]));
                        }
                    }
                    // Along y and z one x position at a time, in registers.
                    let to = v.add(ci * tiles + 8 * tv);
                    for l in 0..4 {
                        let mut c = [_mm256_setzero_ps(); 16];
                        for i in 0..4 {
                            let k = |j: usize| (i * 4 + j) * 4 + l;
                            let r = input_1d([b[k(0)], b[k(1)], b[k(2)], b[k(3)]]);
                            c[i * 4..i * 4 + 4].copy_from_slice(&r);
                        }
                        for j in 0..4 {
                            let r = input_1d([c[j], c[4 + j], c[8 + j], c[12 + j]]);
                            for (i, value) in r.into_iter().enumerate() {
                                _mm256_storeu_ps(to.add(((i * 4 + j) * 4 + l) * v_stride), value);
                            }
                        }
                    }
                }
            }
            for k in 0..64 {
                products(
                    v.add(k * v_stride),
                    weights.u.as_ptr().add(k * cin * cout),
                    m.add(k * m_stride),
                    cin,
                    cout,
                    vectors,
                );
            }
            let stride = m_stride;
            for co in 0..cout {
                for tv in 0..vectors {
                    let from = m.add(co * tiles + 8 * tv);
                    let mut along_x = [_mm256_setzero_ps(); 32];
                    for ij in 0..16 {
                        let k = ij * 4;
                        let r = output_1d([
                            _mm256_loadu_ps(from.add(k * stride)),
                            _mm256_loadu_ps(from.add((k + 1) * stride)),
                            _mm256_loadu_ps(from.add((k + 2) * stride)),
                            _mm256_loadu_ps(from.add((k + 3) * stride)),
                        ]);
                        along_x[ij * 2..ij * 2 + 2].copy_from_slice(&r);
                    }
                    let mut along_y = [_mm256_setzero_ps(); 16];
                    for i in 0..4 {
                        for l in 0..2 {
                            let k = |j: usize| (i * 4 + j) * 2 + l;
                            let r = output_1d([
                                along_x[k(0)],
                                along_x[k(1)],
                                along_x[k(2)],
                                along_x[k(3)],
                            ]);
                            along_y[(i * 2) * 2 + l] = r[0];
                            along_y[(i * 2 + 1) * 2 + l] = r[1];
                        }
                    }
                    for b in 0..2 {
                        let mut o = [[_mm256_setzero_ps(); 2]; 2];
                        for l in 0..2 {
                            let k = |i: usize| (i * 2 + b) * 2 + l;
                            let r = output_1d([
                                along_y[k(0)],
                                along_y[k(1)],
                                along_y[k(2)],
                                along_y[k(3)],
                            ]);
                            o[0][l] = r[0];
                            o[1][l] = r[1];
                        }
                        for (a, pair) in o.iter().enumerate() {
                            let (z, y) = (2 * tz + a, 2 * ty + b);
                            if z >= g.d || y >= g.h {
                                continue;
                            }
                            // Even and odd outputs along x back into order: 16 consecutive voxels.
                            let lo = _mm256_unpacklo_ps(pair[0], pair[1]);
                            let hi = _mm256_unpackhi_ps(pair[0], pair[1]);
                            let first = _mm256_permute2f128_ps::<0x20>(lo, hi);
                            let second = _mm256_permute2f128_ps::<0x31>(lo, hi);
                            let x0 = 16 * tv;
                            let dst = out.add(((co * g.d + z) * g.h + y) * g.w + x0);
                            if x0 + 16 <= g.w {
                                _mm256_storeu_ps(dst, first);
                                _mm256_storeu_ps(dst.add(8), second);
                            } else {
                                let mut tail = [0f32; 16];
                                _mm256_storeu_ps(tail.as_mut_ptr(), first);
                                _mm256_storeu_ps(tail.as_mut_ptr().add(8), second);
                                std::ptr::copy_nonoverlapping(tail.as_ptr(), dst, g.w - x0);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The tile at `index` of the whole volume (x fastest): its first voxel in a channel of `padded`.
    fn tile_origin(g: &Geometry, index: usize) -> (usize, usize, usize) {
        let tiles_x = g.w.div_ceil(2);
        let (tz, rest) = (index / (g.tiles_y * tiles_x), index % (g.tiles_y * tiles_x));
        (2 * tz, 2 * (rest / tiles_x), 2 * (rest % tiles_x))
    }

    /// [`super::Layout::AllTiles`]: transforms channel `ci` of every tile into `v [64][cin][8 * vectors]` (stride
    /// `v_stride` per position), eight tiles per vector, tiles past the last zero.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `v` holds `64 * v_stride` floats; no other thread writes channel `ci` of `v`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // positions are computed from the indices, as in the paper's notation
    pub(super) unsafe fn input_tiles(
        padded: &[f32],
        g: &Geometry,
        ci: usize,
        vectors: usize,
        v: *mut f32,
        v_stride: usize,
    ) {
        let tiles = g.d.div_ceil(2) * g.tiles_y * g.w.div_ceil(2);
        let (plane, channel) = (g.yp * g.xp, g.zp * g.yp * g.xp);
        for tv in 0..vectors {
            // The 4x4x4 inputs of eight tiles, one tile per lane.
            let mut lanes = [[0f32; 8]; 64];
            for lane in 0..8.min(tiles - 8 * tv) {
                let (z, y, x) = tile_origin(g, 8 * tv + lane);
                let base = ci * channel + z * plane + y * g.xp + x;
                for i in 0..4 {
                    for j in 0..4 {
                        let row = &padded[base + i * plane + j * g.xp..][..4];
                        for (l, &value) in row.iter().enumerate() {
                            lanes[(i * 4 + j) * 4 + l][lane] = value;
                        }
                    }
                }
            }
            let mut b = [_mm256_setzero_ps(); 64];
            for (k, values) in lanes.iter().enumerate() {
                b[k] = _mm256_loadu_ps(values.as_ptr());
            }
            // Along x, y and z in turn (position (i * 4 + j) * 4 + l: z, y, x).
            for ij in 0..16 {
                let r = input_1d([b[ij * 4], b[ij * 4 + 1], b[ij * 4 + 2], b[ij * 4 + 3]]);
                b[ij * 4..ij * 4 + 4].copy_from_slice(&r);
            }
            for i in 0..4 {
                for l in 0..4 {
                    let k = |j: usize| (i * 4 + j) * 4 + l;
                    let r = input_1d([b[k(0)], b[k(1)], b[k(2)], b[k(3)]]);
                    for j in 0..4 {
                        b[k(j)] = r[j];
                    }
                }
            }
            for j in 0..4 {
                for l in 0..4 {
                    let k = |i: usize| (i * 4 + j) * 4 + l;
                    let r = input_1d([b[k(0)], b[k(1)], b[k(2)], b[k(3)]]);
                    for i in 0..4 {
                        b[k(i)] = r[i];
                    }
                }
            }
            let to = v.add(ci * 8 * vectors + 8 * tv);
            for (k, value) in b.iter().enumerate() {
                _mm256_storeu_ps(to.add(k * v_stride), *value);
            }
        }
    }

    /// [`super::Layout::AllTiles`]: output channel `co` of every tile from the products `m [64][cout][8 *
    /// vectors]` (stride `m_stride` per position) into `out [cout][d][h][w]`, voxels past the edges left out.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `m` holds the products; `out` has the size `g` gives and no other thread writes
    /// its channel `co`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn output_tiles(
        m: *const f32,
        m_stride: usize,
        g: &Geometry,
        co: usize,
        vectors: usize,
        out: *mut f32,
    ) {
        let tiles = g.d.div_ceil(2) * g.tiles_y * g.w.div_ceil(2);
        for tv in 0..vectors {
            let from = m.add(co * 8 * vectors + 8 * tv);
            let at = |k: usize| _mm256_loadu_ps(from.add(k * m_stride));
            // Along x: [z][y][x'] with x' in 0..2.
            let mut along_x = [_mm256_setzero_ps(); 32];
            for ij in 0..16 {
                let k = ij * 4;
                let r = output_1d([at(k), at(k + 1), at(k + 2), at(k + 3)]);
                along_x[ij * 2..ij * 2 + 2].copy_from_slice(&r);
            }
            // Along y: [z][y'][x'].
            let mut along_y = [_mm256_setzero_ps(); 16];
            for i in 0..4 {
                for l in 0..2 {
                    let k = |j: usize| (i * 4 + j) * 2 + l;
                    let r = output_1d([along_x[k(0)], along_x[k(1)], along_x[k(2)], along_x[k(3)]]);
                    along_y[(i * 2) * 2 + l] = r[0];
                    along_y[(i * 2 + 1) * 2 + l] = r[1];
                }
            }
            // Along z: [z'][y'][x'], eight tiles per vector.
            let mut outputs = [[0f32; 8]; 8];
            for b in 0..2 {
                for l in 0..2 {
                    let k = |i: usize| (i * 2 + b) * 2 + l;
                    let r = output_1d([along_y[k(0)], along_y[k(1)], along_y[k(2)], along_y[k(3)]]);
                    for (a, value) in r.iter().enumerate() {
                        _mm256_storeu_ps(outputs[(a * 2 + b) * 2 + l].as_mut_ptr(), *value);
                    }
                }
            }
            for lane in 0..8.min(tiles - 8 * tv) {
                let (z0, y0, x0) = tile_origin(g, 8 * tv + lane);
                for (abl, values) in outputs.iter().enumerate() {
                    let (z, y, x) = (z0 + abl / 4, y0 + (abl / 2) % 2, x0 + abl % 2);
                    if z < g.d && y < g.h && x < g.w {
                        *out.add(((co * g.d + z) * g.h + y) * g.w + x) = values[lane];
                    }
                }
            }
        }
    }

    /// `m [cout][tiles] = u^T v` for `u [cin][cout]`, `v [cin][tiles]`, in register blocks of 8-12 accumulators.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn products(
        v: *const f32,
        u: *const f32,
        m: *mut f32,
        cin: usize,
        cout: usize,
        vectors: usize,
    ) {
        let tiles = 8 * vectors;
        macro_rules! blocks {
            ($nv:literal, $nc:literal) => {{
                for co in (0..cout).step_by($nc) {
                    for tv in (0..vectors).step_by($nv) {
                        block::<$nv, $nc>(
                            v.add(8 * tv),
                            u.add(co),
                            m.add(co * tiles + 8 * tv),
                            cin,
                            cout,
                            tiles,
                        );
                    }
                }
            }};
        }
        match (vectors % 4, vectors % 2, cout % 3, cout % 6) {
            (0, _, 0, _) => blocks!(4, 3),
            (0, _, _, _) => blocks!(4, 2),
            (_, 0, _, 0) => blocks!(2, 6),
            (_, 0, _, _) => blocks!(2, 4),
            _ => blocks!(1, 8),
        }
    }

    /// `NC` output channels x `NV` vectors of tiles.
    #[inline(always)]
    unsafe fn block<const NV: usize, const NC: usize>(
        v: *const f32,
        u: *const f32,
        m: *mut f32,
        cin: usize,
        cout: usize,
        tiles: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; NC];
        // Whichever order keeps accumulators, broadcasts and loads within the 16 vector registers.
        for ci in 0..cin {
            if NC <= NV {
                let mut broadcasts = [_mm256_setzero_ps(); NC];
                for (c, b) in broadcasts.iter_mut().enumerate() {
                    *b = _mm256_broadcast_ss(&*u.add(ci * cout + c));
                }
                for t in 0..NV {
                    let x = _mm256_loadu_ps(v.add(ci * tiles + 8 * t));
                    for (row, b) in acc.iter_mut().zip(broadcasts) {
                        row[t] = _mm256_fmadd_ps(b, x, row[t]);
                    }
                }
            } else {
                let mut xs = [_mm256_setzero_ps(); NV];
                for (t, x) in xs.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(v.add(ci * tiles + 8 * t));
                }
                for (c, row) in acc.iter_mut().enumerate() {
                    let b = _mm256_broadcast_ss(&*u.add(ci * cout + c));
                    for (a, x) in row.iter_mut().zip(xs) {
                        *a = _mm256_fmadd_ps(b, x, *a);
                    }
                }
            }
        }
        for (c, row) in acc.iter().enumerate() {
            for (t, a) in row.iter().enumerate() {
                _mm256_storeu_ps(m.add(c * tiles + 8 * t), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(x: &Tensor, w: &Tensor) -> Tensor {
        x.conv3d(w, None::<&Tensor>, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1)
    }

    #[test]
    fn matches_libtorch_within_rounding_on_odd_and_even_shapes() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX2/FMA");
            return;
        }
        tch::manual_seed(3);
        let _on = enable(true);
        // Batch 2, odd sizes (partial tiles), x wider than one vector of tiles, every block shape of products.
        for (n, cin, cout, dims) in [
            (2, 16, 24, [17, 16, 19]),
            (1, 8, 8, [16, 16, 16]),
            (1, 24, 48, [16, 17, 33]),
            (1, 3, 16, [16, 18, 64]),
            (1, 8, 96, [16, 16, 16]),
            // Narrower than 16: every tile at once (Layout::AllTiles), odd sizes, one vector and several.
            (1, 16, 24, [8, 8, 8]),
            (2, 8, 16, [9, 10, 11]),
            (1, 24, 8, [8, 9, 15]),
        ] {
            let x = Tensor::randn(
                [n, cin, dims[0], dims[1], dims[2]],
                (Kind::Float, Device::Cpu),
            );
            let w = Tensor::randn([cout, cin, 3, 3, 3], (Kind::Float, Device::Cpu)) * 0.1;
            let want = direct(&x, &w);
            let got = Filters::default()
                .conv3x3(&x, &w)
                .expect("the path applies");
            assert_eq!(got.size(), want.size());
            let rel = f64::try_from((&got - &want).abs().max()).unwrap()
                / f64::try_from(want.abs().max()).unwrap();
            assert!(
                rel < 2e-6,
                "{n} x {cin} -> {cout} at {dims:?}: relative difference {rel:e}"
            );
        }
    }

    #[test]
    fn both_layouts_give_the_same_bits() {
        if !available() {
            return;
        }
        tch::manual_seed(7);
        // Wide enough for rows of tiles, odd on every axis, a partial last vector either way.
        let (cin, cout, dims) = (8, 16, [9usize, 11, 21]);
        let [d, h, w] = dims;
        let x: Vec<f32> = Vec::try_from(Tensor::randn(
            [(cin * d * h * w) as i64],
            (Kind::Float, Device::Cpu),
        ))
        .unwrap();
        let raw: Vec<f32> = Vec::try_from(Tensor::randn(
            [(cout * cin * 27) as i64],
            (Kind::Float, Device::Cpu),
        ))
        .unwrap();
        let transformed = TransformedWeights::new(&raw, cout, cin);
        let run = |layout: Layout| {
            let mut out = vec![f32::NAN; cout * d * h * w];
            convolve_as(&x, dims, &transformed, &mut out, 2, layout);
            out
        };
        let rows = run(Layout::Rows);
        assert!(rows.iter().all(|v| v.is_finite()), "every output written");
        assert_eq!(as_bits(&run(Layout::AllTiles)), as_bits(&rows));
    }

    #[test]
    fn every_split_among_threads_gives_the_same_bits() {
        if !available() {
            return;
        }
        tch::manual_seed(5);
        let (cin, cout, dims) = (8, 16, [17usize, 18, 35]);
        let [d, h, w] = dims;
        let x = Tensor::randn(
            [cin as i64, d as i64, h as i64, w as i64],
            (Kind::Float, Device::Cpu),
        );
        let weight = Tensor::randn(
            [cout as i64, cin as i64, 3, 3, 3],
            (Kind::Float, Device::Cpu),
        );
        let x: Vec<f32> = Vec::try_from(x.view(-1)).unwrap();
        let raw: Vec<f32> = Vec::try_from(weight.view(-1)).unwrap();
        let transformed = TransformedWeights::new(&raw, cout, cin);
        for layout in [Layout::Rows, Layout::AllTiles] {
            let run = |threads: usize| {
                let mut out = vec![f32::NAN; cout * d * h * w];
                convolve_as(&x, dims, &transformed, &mut out, threads, layout);
                out
            };
            let one = run(1);
            assert!(
                one.iter().all(|v| v.is_finite()),
                "{layout:?}: every output written"
            );
            for threads in [2, 3, 8] {
                assert_eq!(
                    as_bits(&run(threads)),
                    as_bits(&one),
                    "{layout:?}, {threads} threads"
                );
            }
        }
    }

    #[test]
    fn changed_weights_are_transformed_again() {
        if !available() {
            return;
        }
        let _on = enable(true);
        let x = Tensor::randn([1, 8, 16, 16, 16], (Kind::Float, Device::Cpu));
        let mut w = Tensor::randn([8, 8, 3, 3, 3], (Kind::Float, Device::Cpu));
        let filters = Filters::default();
        let first = filters.conv3x3(&x, &w).unwrap();
        // Updated in place (as an optimizer does): same storage, other values.
        let _ = tch::no_grad(|| w.g_mul_scalar_(2.0));
        let second = filters.conv3x3(&x, &w).unwrap();
        let rel = f64::try_from((&second - &first * 2.0).abs().max()).unwrap()
            / f64::try_from(second.abs().max()).unwrap();
        assert!(rel < 1e-6, "{rel:e}");
    }

    #[test]
    fn applies_only_where_enabled_and_supported() {
        let filters = Filters::default();
        let conv = |x: &Tensor, w: &Tensor| filters.conv3x3(x, w);
        let x = Tensor::randn([1, 8, 16, 16, 16], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([8, 8, 3, 3, 3], (Kind::Float, Device::Cpu));
        assert!(conv(&x, &w).is_none(), "off unless enabled");
        let _on = enable(true);
        assert_eq!(conv(&x, &w).is_some(), available());
        // Output channels not a multiple of 8, float64, 1x1 kernels, a side under MIN_SIZE: libtorch's.
        let w12 = Tensor::randn([12, 8, 3, 3, 3], (Kind::Float, Device::Cpu));
        assert!(conv(&x, &w12).is_none());
        assert!(conv(&x.to_kind(Kind::Double), &w.to_kind(Kind::Double)).is_none());
        let w1 = Tensor::randn([8, 8, 1, 1, 1], (Kind::Float, Device::Cpu));
        assert!(conv(&x, &w1).is_none());
        let small = Tensor::randn([1, 8, 16, 4, 16], (Kind::Float, Device::Cpu));
        assert!(conv(&small, &w).is_none());
        {
            let _off = enable(false);
            assert!(conv(&x, &w).is_none());
        }
        assert!(enabled(), "the inner guard restores the outer setting");
        // Another thread starts with the path off.
        assert!(!std::thread::spawn(enabled).join().unwrap());
    }
}
