//! containerd's filter language, as Walk (the `List` RPC) receives it.
//!
//! A request carries filter strings; a snapshot matches when any one of them
//! matches (OR). A filter is selectors joined by `,`, all of which must hold
//! (AND). A selector is a field path, alone (the field is present and not
//! empty) or followed by `==`, `!=` or `~=` (regular expression) and a value.
//! Field path parts are separated by `.` and may be double-quoted, so label
//! keys with dots work: `labels."containerd.io/gc.root"`. Values may be
//! double-quoted too. Snapshot fields: `name`, `parent`, `kind`, `labels.<key>`.
//!
//! Written by hand: containerd's Go parser has no Rust counterpart, and the
//! grammar is small.

use std::collections::BTreeMap;

use regex::Regex;

/// A filter that failed to parse, with the position of the problem.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid filter {filter:?} at byte {at}: {problem}")]
pub struct ParseError {
    /// The filter string.
    pub filter: String,
    /// Byte offset.
    pub at: usize,
    /// What is wrong.
    pub problem: String,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// Parsed filters: OR of ANDs of selectors.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    any_of: Vec<Vec<Selector>>,
}

/// The fields of a snapshot that filters can test.
#[derive(Debug)]
pub struct Fields<'a> {
    /// Snapshot key or name.
    pub name: &'a str,
    /// Parent name, empty if none.
    pub parent: &'a str,
    /// `active`, `view` or `committed`.
    pub kind: &'a str,
    /// Labels.
    pub labels: &'a BTreeMap<String, String>,
}

impl Filters {
    /// Parses the filter strings of a request; none or only empty ones match all.
    pub fn parse(filters: &[String]) -> Result<Filters, ParseError> {
        let any_of = filters
            .iter()
            .filter(|f| !f.trim().is_empty())
            .map(|f| Parser::new(f).filter())
            .collect::<Result<_, _>>()?;
        Ok(Filters { any_of })
    }

    /// Whether the snapshot with these fields matches.
    pub fn matches(&self, f: &Fields<'_>) -> bool {
        self.any_of.is_empty()
            || self
                .any_of
                .iter()
                .any(|all| all.iter().all(|s| s.matches(f)))
    }
}

impl Selector {
    fn matches(&self, f: &Fields<'_>) -> bool {
        let value: Option<&str> = match self.path.as_slice() {
            [one] if one == "name" => Some(f.name),
            [one] if one == "parent" => Some(f.parent),
            [one] if one == "kind" => Some(f.kind),
            [labels, key] if labels == "labels" => f.labels.get(key).map(String::as_str),
            // containerd treats unknown fields as absent.
            _ => None,
        };
        match &self.op {
            Op::Present => value.is_some_and(|v| !v.is_empty()),
            Op::Eq(want) => value == Some(want.as_str()),
            Op::Ne(want) => value != Some(want.as_str()),
            Op::Matches(re) => value.is_some_and(|v| re.is_match(v)),
        }
    }
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(s: &'a str) -> Self {
        Parser { s, pos: 0 }
    }

    fn err(&self, problem: impl Into<String>) -> ParseError {
        ParseError {
            filter: self.s.into(),
            at: self.pos,
            problem: problem.into(),
        }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn skip_ws(&mut self) {
        while self.rest().starts_with([' ', '\t']) {
            self.pos += 1;
        }
    }

    fn filter(&mut self) -> Result<Vec<Selector>, ParseError> {
        let mut out = vec![self.selector()?];
        loop {
            self.skip_ws();
            if self.rest().is_empty() {
                return Ok(out);
            }
            if !self.rest().starts_with(',') {
                return Err(self.err("expected ',' between selectors"));
            }
            self.pos += 1;
            out.push(self.selector()?);
        }
    }

    fn selector(&mut self) -> Result<Selector, ParseError> {
        self.skip_ws();
        let mut path = vec![self.field()?];
        while self.rest().starts_with('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        self.skip_ws();
        let op = if let Some(r) = self.rest().strip_prefix("==") {
            self.pos = self.s.len() - r.len();
            Op::Eq(self.value()?)
        } else if let Some(r) = self.rest().strip_prefix("!=") {
            self.pos = self.s.len() - r.len();
            Op::Ne(self.value()?)
        } else if let Some(r) = self.rest().strip_prefix("~=") {
            self.pos = self.s.len() - r.len();
            let at = self.pos;
            let v = self.value()?;
            Op::Matches(Regex::new(&v).map_err(|e| ParseError {
                filter: self.s.into(),
                at,
                problem: format!("bad regular expression: {e}"),
            })?)
        } else {
            Op::Present
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, ParseError> {
        if self.rest().starts_with('"') {
            return self.quoted();
        }
        let len = self
            .rest()
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(self.err("expected a field name"));
        }
        let f = self.rest()[..len].to_string();
        self.pos += len;
        Ok(f)
    }

    fn value(&mut self) -> Result<String, ParseError> {
        self.skip_ws();
        if self.rest().starts_with('"') {
            return self.quoted();
        }
        let len = self.rest().find(',').unwrap_or(self.rest().len());
        let v = self.rest()[..len].trim_end().to_string();
        if v.is_empty() {
            return Err(self.err("expected a value"));
        }
        self.pos += len;
        Ok(v)
    }

    fn quoted(&mut self) -> Result<String, ParseError> {
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, e)) => out.push(e),
                    None => break,
                },
                c => out.push(c),
            }
        }
        self.pos = start;
        Err(self.err("unterminated quoted string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn m(
        filters: &[&str],
        name: &str,
        parent: &str,
        kind: &str,
        l: &BTreeMap<String, String>,
    ) -> bool {
        let f: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        Filters::parse(&f).unwrap().matches(&Fields {
            name,
            parent,
            kind,
            labels: l,
        })
    }

    #[test]
    fn selectors_and_or_and_quoted_label_keys() {
        let l = labels(&[("containerd.io/gc.root", "x"), ("team", "a b")]);
        assert!(m(&[], "n", "", "active", &l));
        assert!(m(
            &["labels.\"containerd.io/gc.root\""],
            "n",
            "",
            "active",
            &l
        ));
        assert!(!m(
            &["labels.\"containerd.io/gc.other\""],
            "n",
            "",
            "active",
            &l
        ));
        assert!(m(&["kind==committed,name==n"], "n", "", "committed", &l));
        assert!(!m(&["kind==committed,name==m"], "n", "", "committed", &l));
        assert!(
            m(&["kind==view", "name==n"], "n", "", "active", &l),
            "OR across strings"
        );
        assert!(m(&["labels.team==\"a b\""], "n", "", "active", &l));
        assert!(m(&["parent!=p"], "n", "q", "active", &l));
        assert!(m(
            &["name~=^sha256:[0-9a-f]+$"],
            "sha256:ab12",
            "",
            "committed",
            &l
        ));
        assert!(
            !m(&["parent"], "n", "", "active", &l),
            "empty parent is absent"
        );
        assert!(
            !m(&["size==1"], "n", "", "active", &l),
            "unknown fields are absent"
        );
    }

    #[test]
    fn arbitrary_filter_text_never_panics() {
        use rand::{Rng, SeedableRng};
        let alphabet: Vec<char> = "ab.\"=!~,\\ /é\u{1F600}(".chars().collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let l = labels(&[("a", "b")]);
        for _ in 0..5000 {
            let len = rng.random_range(0..24);
            let f: String = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            if let Ok(p) = Filters::parse(&[f]) {
                let _ = p.matches(&Fields {
                    name: "a",
                    parent: "",
                    kind: "active",
                    labels: &l,
                });
            }
        }
    }

    #[test]
    fn malformed_filters_are_rejected_with_a_position() {
        for bad in ["==x", "name==", "labels.\"open", "name~=(", "a b"] {
            let e = Filters::parse(&[bad.to_string()]).unwrap_err();
            assert_eq!(e.filter, bad);
        }
    }
}
