//! The conformance table.

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub case: String,
    pub expected: String,
    pub observed: String,
}

impl Row {
    pub fn passed(&self) -> bool {
        self.expected == self.observed
    }
}

/// Widest a column may get before its cells are cut.
const MAX_WIDTH: usize = 72;

fn cell(s: &str) -> String {
    // Keep the table one line per row whatever a probe printed.
    let flat: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if flat.chars().count() > MAX_WIDTH {
        let cut: String = flat.chars().take(MAX_WIDTH - 3).collect();
        format!("{cut}...")
    } else {
        flat
    }
}

/// The table, header first, then the final `N passed, M failed` line.
pub fn render(rows: &[Row]) -> String {
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            let verdict = if r.passed() { "PASS" } else { "FAIL" };
            [cell(&r.case), cell(&r.expected), cell(&r.observed), verdict.to_string()]
        })
        .collect();
    let header = ["case", "expected", "observed", "result"].map(String::from);
    let mut width = header.clone().map(|h| h.chars().count());
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |c: &[String; 4]| {
        let mut s = String::new();
        for (i, (text, w)) in c.iter().zip(width).enumerate() {
            if i > 0 {
                s += " | ";
            }
            if i == 3 {
                s += text;
            } else {
                s += text;
                s += &" ".repeat(w - text.chars().count());
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&header);
    out += &width.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-|-");
    out += "\n";
    for c in &cells {
        out += &line(c);
    }
    out += &summary(rows);
    out += "\n";
    out
}

/// `N passed, M failed`.
pub fn summary(rows: &[Row]) -> String {
    let passed = rows.iter().filter(|r| r.passed()).count();
    format!("{passed} passed, {} failed", rows.len() - passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(case: &str, expected: &str, observed: &str) -> Row {
        Row { case: case.into(), expected: expected.into(), observed: observed.into() }
    }

    #[test]
    fn renders_aligned_columns_and_summary() {
        let rows = [row("vmmctl mode", "OK 0:5 0660", "OK 0:5 0660"), row("ro open", "EPERM", "OK")];
        let t = render(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0], "case        | expected    | observed    | result");
        assert!(lines[1].starts_with("------------|-"));
        assert_eq!(lines[2], "vmmctl mode | OK 0:5 0660 | OK 0:5 0660 | PASS");
        assert_eq!(lines[3], "ro open     | EPERM       | OK          | FAIL");
        assert_eq!(lines[4], "1 passed, 1 failed");
    }

    #[test]
    fn cells_are_flattened_and_cut() {
        let long = "y".repeat(200);
        let t = render(&[row("a\tb\nc", &long, &long)]);
        let body = t.lines().nth(2).unwrap();
        assert!(body.starts_with("a b c | "));
        assert!(body.contains(&format!("{}...", "y".repeat(MAX_WIDTH - 3))));
        assert!(body.ends_with("| PASS"));
    }

    #[test]
    fn summary_counts() {
        assert_eq!(summary(&[]), "0 passed, 0 failed");
        assert_eq!(summary(&[row("a", "OK", "OK"), row("b", "OK", "OK")]), "2 passed, 0 failed");
    }
}
