//! Plain left/right-aligned text tables for the human output.
//!
//! Hand-written rather than a table crate: the CLI needs only padded
//! columns of ASCII, no wrapping, borders or colours, and output that stays
//! byte-stable for people who `grep` it. Twenty lines do that.

/// A table: a header row and data rows of equal width.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(header: I) -> Table {
        Table { header: header.into_iter().map(Into::into).collect(), rows: Vec::new() }
    }

    /// Adds a row.
    pub fn row<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, cells: I) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// Renders with two spaces between columns; a column whose cells are all
    /// numbers (or `-`) is right-aligned.
    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        let mut numeric = vec![true; columns];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
                numeric[i] &= cell == "-" || cell.parse::<f64>().is_ok();
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for i in 0..columns {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    line.push_str("  ");
                }
                if numeric[i] {
                    line.push_str(&format!("{cell:>w$}", w = widths[i]));
                } else {
                    line.push_str(&format!("{cell:<w$}", w = widths[i]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(["NODE", "ADDR", "LEADS"]);
        t.row(["1", "127.0.0.1:7001", "12"]);
        t.row(["10", "h:1", "3"]);
        assert_eq!(
            t.render(),
            "NODE  ADDR            LEADS\n   1  127.0.0.1:7001     12\n  10  h:1                 3\n"
        );
    }
}
