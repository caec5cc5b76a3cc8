//! Output for people (aligned tables, colour on terminals) and for scripts (`--json`).

use std::io::IsTerminal;

/// True when colour should be used on stdout.
pub fn color() -> bool {
    std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal()
}

/// Wraps `s` in an ANSI style when colour is on.
pub fn paint(s: &str, code: &str) -> String {
    if color() {
        format!("\x1b[{code}m{s}\x1b[0m")
    } else {
        s.to_string()
    }
}

/// Display width of `s` (characters; emoji count as two columns).
fn width(s: &str) -> usize {
    s.chars().map(|c| if (c as u32) >= 0x1F000 || c == '✅' || c == '⛔' { 2 } else { 1 }).sum()
}

/// A table with a title, a header row and aligned columns.
#[derive(Debug, Default)]
pub struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table titled `title` with columns `header`.
    pub fn new(title: &str, header: &[&str]) -> Self {
        Table { title: title.to_string(), header: header.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders with box lines.
    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut w: Vec<usize> = self.header.iter().map(|h| width(h)).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(width(c));
            }
        }
        let total: usize = w.iter().sum::<usize>() + 3 * n + 1;
        let line = |l: char, m: char, r: char| {
            let mut s = String::new();
            s.push(l);
            for (i, cw) in w.iter().enumerate() {
                s.push_str(&"─".repeat(cw + 2));
                s.push(if i + 1 == n { r } else { m });
            }
            s
        };
        let fmt_row = |cells: &[String], bold: bool| {
            let mut s = String::from("│");
            for (i, cw) in w.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                let pad = cw - width(c);
                let c = if bold { paint(c, "1") } else { c.to_string() };
                s.push_str(&format!(" {c}{} │", " ".repeat(pad)));
            }
            s
        };
        let mut out = String::new();
        if !self.title.is_empty() {
            out.push_str(&format!("╭{}╮\n", "─".repeat(total - 2)));
            let pad = total - 4 - width(&self.title).min(total - 4);
            out.push_str(&format!("│ {}{} │\n", paint(&self.title, "1"), " ".repeat(pad)));
            out.push_str(&line('├', '┬', '┤'));
        } else {
            out.push_str(&line('╭', '┬', '╮'));
        }
        out.push('\n');
        out.push_str(&fmt_row(&self.header, true));
        out.push('\n');
        out.push_str(&line('├', '┼', '┤'));
        out.push('\n');
        for r in &self.rows {
            out.push_str(&fmt_row(r, false));
            out.push('\n');
        }
        out.push_str(&line('╰', '┴', '╯'));
        out.push('\n');
        out
    }
}

/// Prints `v` as pretty JSON.
pub fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let mut t = Table::new("Nodes", &["ID", "Name"]);
        t.row(vec!["a".into(), "longer name".into()]);
        t.row(vec!["abcdef".into(), "x".into()]);
        let s = t.render();
        let widths: Vec<usize> = s.lines().map(|l| l.chars().count()).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{s}");
    }
}
