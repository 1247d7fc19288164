//! Plain-text tables in the style of `kubectl get`: upper-case headers, columns padded to the
//! widest cell and separated by three spaces, no borders, so `awk '{print $1}'` works.

pub struct Table<const N: usize> {
    rows: Vec<[String; N]>,
}

impl<const N: usize> Table<N> {
    pub fn new(headers: [&str; N]) -> Self {
        Table {
            rows: vec![headers.map(str::to_string)],
        }
    }

    pub fn row(&mut self, cells: [&str; N]) {
        self.rows.push(cells.map(str::to_string));
    }

    pub fn render(&self) -> String {
        let mut widths = [0usize; N];
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if i + 1 < N {
                    let pad = widths[i] - cell.chars().count() + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `13s ago`, `2m13s ago`, `1h2m ago`, `3d4h ago`: how long before `now_ms` `then_ms` was.
pub fn ago(now_ms: i64, then_ms: i64) -> String {
    let s = (now_ms.saturating_sub(then_ms) / 1000).max(0);
    format!("{} ago", span(s.unsigned_abs()))
}

/// A span of seconds in its two largest units: `13s`, `2m13s`, `1h2m`, `3d4h`.
pub fn span(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_columns_and_trims_line_ends() {
        let mut t = Table::new(["A", "LONGER", "C"]);
        t.row(["wide-cell", "x", ""]);
        assert_eq!(t.render(), "A           LONGER   C\nwide-cell   x\n");
    }

    #[test]
    fn ago_picks_two_units() {
        assert_eq!(ago(10_000, 10_000), "0s ago");
        assert_eq!(ago(10_000, 20_000), "0s ago");
        assert_eq!(ago(13_999, 0), "13s ago");
        assert_eq!(ago(133_000, 0), "2m13s ago");
        assert_eq!(ago(3_720_000, 0), "1h2m ago");
        assert_eq!(ago(273_600_000, 0), "3d4h ago");
    }
}
