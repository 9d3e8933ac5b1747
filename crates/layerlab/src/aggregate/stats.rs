//! Statistics over seeds: mean, sample standard deviation and Student-t confidence intervals.
//!
//! The t quantile is computed here rather than taken from a crate: it needs only the regularized
//! incomplete beta function (Numerical Recipes, 3rd ed., §6.4) and a bisection, and the values are
//! checked against the standard tables below.

/// Mean, spread and 95% interval of one quantity over seeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (n − 1 in the denominator); `None` with fewer than two values.
    pub std: Option<f64>,
    /// 95% Student-t interval for the mean; `None` with fewer than two values, since one seed
    /// says nothing about the spread (an interval of zero width would claim certainty).
    pub ci95: Option<(f64, f64)>,
}

impl Estimate {
    /// Summarises `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Estimate> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = mean(values);
        let std = sample_std(values);
        let ci95 = std.map(|s| {
            let half = t_quantile(0.975, (n - 1) as f64) * s / (n as f64).sqrt();
            (mean - half, mean + half)
        });
        Some(Estimate { n, mean, std, ci95 })
    }
}

pub fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Standard deviation with n − 1 in the denominator; `None` for fewer than two values.
pub fn sample_std(values: &[f64]) -> Option<f64> {
    let n = values.len();
    if n < 2 {
        return None;
    }
    let m = mean(values);
    let ss: f64 = values.iter().map(|v| (v - m).powi(2)).sum();
    Some((ss / (n - 1) as f64).sqrt())
}

/// The p-quantile of Student's t distribution with `df` degrees of freedom (p in (0, 1)).
pub fn t_quantile(p: f64, df: f64) -> f64 {
    assert!(p > 0.0 && p < 1.0 && df > 0.0, "t_quantile needs p in (0, 1) and df > 0");
    if p < 0.5 {
        return -t_quantile(1.0 - p, df);
    }
    // The CDF is increasing, so bisection on [0, hi] converges; hi doubles until it brackets p.
    let mut hi = 1.0;
    while t_cdf(hi, df) < p && hi < 1e12 {
        hi *= 2.0;
    }
    let mut lo = 0.0;
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-13 * hi.max(1.0) {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// Student's t cumulative distribution function.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let x = df / (df + t * t);
    let tail = 0.5 * incomplete_beta(0.5 * df, 0.5, x);
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The regularized incomplete beta function I_x(a, b).
fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp();
    // The continued fraction converges fast only on this side; use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, 1.0 - x) / b
    }
}

/// Continued fraction for the incomplete beta function (modified Lentz's method).
fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// ln Γ(x) for x > 0 (Lanczos approximation, g = 7, nine coefficients).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection formula: Γ(x) Γ(1 − x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEF[0];
    for (i, c) in COEF.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn t_quantiles_match_the_standard_table() {
        // Two-sided 95% critical values from any t table (e.g. NIST/SEMATECH e-Handbook, 1.3.6.7.2).
        for (df, want) in [(1.0, 12.706), (2.0, 4.303), (3.0, 3.182), (4.0, 2.776), (9.0, 2.262), (30.0, 2.042)] {
            let got = t_quantile(0.975, df);
            assert!(close(got, want, 5e-4), "df {df}: {got} vs {want}");
        }
        // Closed forms: df 1 is Cauchy, tan(π (p − ½)); df 2 is (2p − 1) √(2 / (1 − (2p − 1)²)).
        assert!(close(t_quantile(0.975, 1.0), (std::f64::consts::PI * 0.475).tan(), 1e-9));
        let q = 0.95f64;
        assert!(close(t_quantile(0.975, 2.0), q * (2.0 / (1.0 - q * q)).sqrt(), 1e-9));
        // Many degrees of freedom approach the normal quantile.
        assert!(close(t_quantile(0.975, 1e6), 1.959_964, 1e-4));
        assert!(close(t_quantile(0.025, 4.0), -2.776, 5e-4));
        assert!(close(t_cdf(0.0, 3.0), 0.5, 1e-12));
    }

    #[test]
    fn ln_gamma_matches_factorials() {
        assert!(close(ln_gamma(1.0), 0.0, 1e-12));
        assert!(close(ln_gamma(5.0), 24f64.ln(), 1e-12));
        assert!(close(ln_gamma(0.5), std::f64::consts::PI.sqrt().ln(), 1e-12));
    }

    #[test]
    fn estimate_by_hand() {
        // Values 0.1, 0.2, 0.3: mean 0.2, s = sqrt((0.01 + 0 + 0.01) / 2) = 0.1,
        // half-width = t_{0.975, 2} · 0.1 / √3 = 4.302653 · 0.057735 = 0.248414.
        let e = Estimate::of(&[0.1, 0.2, 0.3]).unwrap();
        assert_eq!(e.n, 3);
        assert!(close(e.mean, 0.2, 1e-12));
        assert!(close(e.std.unwrap(), 0.1, 1e-12));
        let (lo, hi) = e.ci95.unwrap();
        assert!(close(hi - e.mean, 0.248_414, 1e-5), "{hi}");
        assert!(close(e.mean - lo, 0.248_414, 1e-5), "{lo}");
        // One seed: a mean, but no spread and no interval.
        let one = Estimate::of(&[0.42]).unwrap();
        assert_eq!((one.mean, one.std, one.ci95), (0.42, None, None));
        assert!(Estimate::of(&[]).is_none());
    }
}
