//! The profile's [T, T] products, causal (zero above the diagonal), computed in bands of
//! rows straight into the caller's buffers: a band of rows needs only the columns up to
//! its last row, so the products skip most of the zero upper triangle (with 8 bands, 9/16
//! of the full product's work), and nothing is copied in or out of tensors.
//!
//! Matrices are row-major f32 slices: `[T, T]` for the probabilities and dS, `[T, D]`
//! for one head's q, k, v and their gradients.

use gemm::Parallelism;
use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers a thread keeps for reuse (a backward head holds two at a time).
const POOL_KEEP: usize = 4;

thread_local! {
    /// [T, T] buffers given back by [`Square`]s of this thread.
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A [T, T] row-major buffer taken from this thread's pool and given back when dropped:
/// a profile allocates three per head and layer, 16-64 MB each at 2k-4k tokens, and
/// fresh ones cost a page fault per 4 KB (a tenth of the profile's time went to the
/// kernel before). Its entries are whatever the last use left until written.
pub(super) struct Square {
    buf: Vec<f32>,
}

impl Square {
    fn take(len: usize) -> Square {
        let mut buf = POOL
            .with(|p| {
                let mut p = p.borrow_mut();
                // The smallest buffer that holds `len`, else the largest (it grows).
                let fit = (0..p.len())
                    .filter(|&x| p[x].capacity() >= len)
                    .min_by_key(|&x| p[x].capacity())
                    .or_else(|| (0..p.len()).max_by_key(|&x| p[x].capacity()));
                fit.map(|x| p.swap_remove(x))
            })
            .unwrap_or_default();
        // Entries past the old length start at 0; the rest keep their stale values.
        buf.resize(len, 0.0);
        Square { buf }
    }
}

impl Deref for Square {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf
    }
}

impl DerefMut for Square {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf
    }
}

impl Drop for Square {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        // A thread being torn down has no pool left: the buffer is simply freed.
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_KEEP {
                p.push(buf);
            }
        });
    }
}

/// Frees the pooled buffers of every thread of the current rayon pool and of this one
/// (after a profile: the memory goes back before the next stage).
pub(super) fn release_scratch() {
    rayon::broadcast(|_| POOL.with(|p| p.borrow_mut().clear()));
    POOL.with(|p| p.borrow_mut().clear());
}

/// Rows of a causal [T, T] product taken at a time.
pub(super) fn band_rows(t: usize) -> usize {
    (t / 8).clamp(64, 512)
}

/// One past the last column [`scores`] writes in row `i`: the end of its band.
pub(super) fn band_end(i: usize, t: usize) -> usize {
    let band = band_rows(t);
    ((i / band + 1) * band).min(t)
}

/// A strided view of a matrix inside a slice: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl View<'_> {
    /// Whether every element lies inside `data`.
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `out[r * out_rs + c] = scale * (a b)[r][c]` for a [m, k] and b [k, n].
fn product(out: &mut [f32], out_rs: usize, a: View<'_>, b: View<'_>, scale: f32) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && a.fits() && b.fits(), "product shapes");
    assert!(
        m == 0 || n == 0 || (m - 1) * out_rs + n <= out.len(),
        "product output"
    );
    assert!(n <= out_rs || m <= 1, "product output rows overlap");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for r in 0..m {
            out[r * out_rs..r * out_rs + n].fill(0.0);
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above keep every element gemm reads inside `a.data` and
    // `b.data` and every element it writes inside `out` (rows of `out` do not overlap);
    // `out` is borrowed mutably, so it aliases neither input. read_dst is false: dst =
    // scale * a b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_rs as isize,
            false,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            0.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// The lower triangle (and diagonal) of `a b^T` for a, b [T, D], as a [T, T] row-major
/// buffer: row i is written up to its band's end ([`band_end`]; entries right of the
/// diagonal whatever the band's product gives), entries past it are undefined (callers
/// read row i only up to its band's end).
pub(super) fn scores(a: &[f32], b: &[f32], t: usize, d: usize) -> Square {
    let band = band_rows(t);
    let mut out = Square::take(t * t);
    let mut r0 = 0;
    while r0 < t {
        let r1 = (r0 + band).min(t);
        let lhs = View {
            data: &a[r0 * d..],
            rows: r1 - r0,
            cols: d,
            rs: d,
            cs: 1,
        };
        // b^T: element (x, j) is b[j][x].
        let rhs = View {
            data: b,
            rows: d,
            cols: r1,
            rs: 1,
            cs: d,
        };
        product(&mut out[r0 * t..], t, lhs, rhs, 1.0);
        r0 = r1;
    }
    out
}

/// `scale * m b` for m [T, T] zero above the diagonal and b [T, D], as [T, D]: each band
/// of rows of m times the rows of b up to its last row.
pub(super) fn left(m: &[f32], b: &[f32], t: usize, d: usize, scale: f32) -> Vec<f32> {
    let band = band_rows(t);
    let mut out = vec![0f32; t * d];
    let mut r0 = 0;
    while r0 < t {
        let r1 = (r0 + band).min(t);
        let lhs = View {
            data: &m[r0 * t..],
            rows: r1 - r0,
            cols: r1,
            rs: t,
            cs: 1,
        };
        let rhs = View {
            data: b,
            rows: r1,
            cols: d,
            rs: d,
            cs: 1,
        };
        product(&mut out[r0 * d..], d, lhs, rhs, scale);
        r0 = r1;
    }
    out
}

/// `scale * m^T b` for m [T, T] zero above the diagonal and b [T, D], as [T, D]: output
/// rows c0..c1 take the entries of m's columns c0..c1 in rows c0.. (the only ones not
/// zero).
pub(super) fn left_t(m: &[f32], b: &[f32], t: usize, d: usize, scale: f32) -> Vec<f32> {
    let band = band_rows(t);
    let mut out = vec![0f32; t * d];
    let mut c0 = 0;
    while c0 < t {
        let c1 = (c0 + band).min(t);
        // m^T restricted: element (c, r) is m[c0 + r][c0 + c].
        let lhs = View {
            data: &m[c0 * t + c0..],
            rows: c1 - c0,
            cols: t - c0,
            rs: 1,
            cs: t,
        };
        let rhs = View {
            data: &b[c0 * d..],
            rows: t - c0,
            cols: d,
            rs: d,
            cs: 1,
        };
        product(&mut out[c0 * d..], d, lhs, rhs, scale);
        c0 = c1;
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    //! The banded causal products against the full products in float64, on fresh random
    //! inputs, for lengths of one band, of several bands and with a partial last band.
    use super::*;
    use moac_runtime::reference::check::Rng;

    fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.uniform()).collect()
    }

    #[test]
    fn banded_causal_products_equal_the_full_ones() {
        let mut rng = Rng::fresh("banded products");
        let d = 8;
        for t in [40usize, 200, 1030] {
            let (a, b) = (rand(&mut rng, t * d), rand(&mut rng, t * d));
            let mut m = rand(&mut rng, t * t);
            for i in 0..t {
                m[i * t + i + 1..(i + 1) * t].fill(0.0);
            }
            let close = |got: f32, want: f64, mag: f64| {
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * mag + 1e-6,
                    "t {t}: {got} vs {want}"
                );
            };
            let s = scores(&a, &b, t, d);
            for i in 0..t {
                for j in 0..=i {
                    let want: f64 = (0..d)
                        .map(|x| a[i * d + x] as f64 * b[j * d + x] as f64)
                        .sum();
                    close(s[i * t + j], want, d as f64);
                }
            }
            let scale = 0.5f32;
            let l = left(&m, &b, t, d, scale);
            let lt = left_t(&m, &b, t, d, scale);
            for i in 0..t {
                for x in 0..d {
                    let want: f64 = (0..=i)
                        .map(|j| m[i * t + j] as f64 * b[j * d + x] as f64)
                        .sum();
                    close(l[i * d + x], 0.5 * want, t as f64);
                    let want_t: f64 = (i..t)
                        .map(|j| m[j * t + i] as f64 * b[j * d + x] as f64)
                        .sum();
                    close(lt[i * d + x], 0.5 * want_t, t as f64);
                }
            }
        }
    }
}
