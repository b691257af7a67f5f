//! Pure numbers: descriptive statistics, ratios, the "client saw more than reported" flag.

/// Mean, sample standard deviation, min, max of a set of values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (n - 1); 0 for a single value.
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

/// Statistics of the finite values; `None` when there are none.
pub fn stats(values: &[f64]) -> Option<Stats> {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n as f64;
    let std = if n > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Stats {
        n,
        mean,
        std,
        min,
        max,
    })
}

/// `a / b`, or `None` when either is missing or `b` is not positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

/// True when the outage a client observed is longer than the downtime the tool reported
/// (the tool's downtime must never be smaller than what a client saw). No tolerance: the
/// probe's resolution is reported next to it, the reader judges.
pub fn probe_exceeds(client_outage_s: Option<f64>, reported_downtime_s: Option<f64>) -> bool {
    match (client_outage_s, reported_downtime_s) {
        (Some(c), Some(r)) => c > r,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let s = stats(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert_eq!(s.n, 8);
        assert!((s.mean - 5.0).abs() < 1e-12);
        // sample variance = 32 / 7
        assert!((s.std - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert_eq!(s.min, 2.0);
        assert_eq!(s.max, 9.0);
    }

    #[test]
    fn single_value_and_empty() {
        let s = stats(&[3.5]).unwrap();
        assert_eq!((s.n, s.mean, s.std, s.min, s.max), (1, 3.5, 0.0, 3.5, 3.5));
        assert!(stats(&[]).is_none());
        assert!(stats(&[f64::NAN]).is_none());
        assert_eq!(stats(&[1.0, f64::NAN, 3.0]).unwrap().mean, 2.0);
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(1.0), Some(4.0)), Some(0.25));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(ratio(Some(2.0), None), None);
    }

    #[test]
    fn exceeds_flag() {
        assert!(probe_exceeds(Some(2.51), Some(2.5)));
        assert!(!probe_exceeds(Some(2.5), Some(2.5)));
        assert!(!probe_exceeds(Some(1.0), Some(2.5)));
        assert!(!probe_exceeds(None, Some(2.5)));
        assert!(!probe_exceeds(Some(3.0), None));
    }
}
