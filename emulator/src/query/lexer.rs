//! Tokenizer for the IoT Hub query language: turns query text into [`Token`]s with positions.
//!
//! Kept separate from the parser so that every token carries the 1-based character position
//! and raw text that syntax errors quote back to the user (they end up in HTTP 400 bodies).
//! Keywords are not recognised here: they are plain identifiers that the parser compares
//! case-insensitively, so `tags.from` stays a valid path.

use super::{CmpOp, QueryError};

/// What kind of token was read.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    /// A name or keyword: letters, digits, `_` and `$`, not starting with a digit.
    Ident(String),
    /// A decimal or `0x` hexadecimal number, without sign.
    Number(f64),
    /// A quoted string with its escapes already resolved.
    Str(String),
    Star,
    Comma,
    Dot,
    Minus,
    LParen,
    RParen,
    LBracket,
    RBracket,
    /// A comparison operator.
    Op(CmpOp),
    /// `+`, `/` or `%`: arithmetic, which twin queries do not support.
    Arith(char),
    /// End of the query text.
    Eof,
}

/// A token, where it starts, and the source text it came from.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Token {
    pub tok: Tok,
    /// 1-based character position of the first character.
    pub pos: usize,
    /// The raw source text, quoted back in error messages.
    pub text: String,
}

impl Token {
    /// How the token reads in an error message ("found ...").
    pub fn describe(&self) -> String {
        match &self.tok {
            Tok::Eof => "the end of the query".to_string(),
            Tok::Str(_) => format!("the string {}", shorten(&self.text)),
            Tok::Number(_) => format!("the number `{}`", shorten(&self.text)),
            _ => format!("`{}`", shorten(&self.text)),
        }
    }
}

/// Cuts long source text so error messages stay readable.
fn shorten(text: &str) -> String {
    const MAX: usize = 40;
    if text.chars().count() <= MAX {
        text.to_string()
    } else {
        let head: String = text.chars().take(MAX).collect();
        format!("{head}…")
    }
}

/// Splits `text` into tokens, ending with one [`Tok::Eof`].
pub(super) fn tokenize(text: &str) -> Result<Vec<Token>, QueryError> {
    let mut lexer = Lexer { chars: text.chars().collect(), i: 0 };
    let mut out = Vec::new();
    loop {
        let token = lexer.next_token()?;
        let done = token.tok == Tok::Eof;
        out.push(token);
        if done {
            return Ok(out);
        }
    }
}

struct Lexer {
    chars: Vec<char>,
    i: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || c == '$'
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

impl Lexer {
    fn peek_at(&self, offset: usize) -> Option<char> {
        self.chars.get(self.i + offset).copied()
    }

    fn source(&self, start: usize) -> String {
        self.chars[start..self.i].iter().collect()
    }

    fn token(&self, tok: Tok, start: usize) -> Token {
        Token { tok, pos: start + 1, text: self.source(start) }
    }

    fn next_token(&mut self) -> Result<Token, QueryError> {
        while self.peek_at(0).is_some_and(char::is_whitespace) {
            self.i += 1;
        }
        let start = self.i;
        let Some(c) = self.peek_at(0) else {
            return Ok(Token { tok: Tok::Eof, pos: start + 1, text: String::new() });
        };
        if is_ident_start(c) {
            while self.peek_at(0).is_some_and(is_ident_char) {
                self.i += 1;
            }
            return Ok(self.token(Tok::Ident(self.source(start)), start));
        }
        if c.is_ascii_digit() {
            return self.number(start);
        }
        if c == '\'' || c == '"' {
            return self.string(start, c);
        }
        self.symbol(start, c)
    }

    fn symbol(&mut self, start: usize, c: char) -> Result<Token, QueryError> {
        let next = self.peek_at(1);
        if c == '[' && next == Some('[') {
            return self.bracketed_name(start);
        }
        let (tok, len) = match (c, next) {
            ('<', Some('=')) => (Tok::Op(CmpOp::Le), 2),
            ('>', Some('=')) => (Tok::Op(CmpOp::Ge), 2),
            ('<', Some('>')) | ('!', Some('=')) => (Tok::Op(CmpOp::Ne), 2),
            ('<', _) => (Tok::Op(CmpOp::Lt), 1),
            ('>', _) => (Tok::Op(CmpOp::Gt), 1),
            ('=', _) => (Tok::Op(CmpOp::Eq), 1),
            ('*', _) => (Tok::Star, 1),
            (',', _) => (Tok::Comma, 1),
            ('.', _) => (Tok::Dot, 1),
            ('-', _) => (Tok::Minus, 1),
            ('(', _) => (Tok::LParen, 1),
            (')', _) => (Tok::RParen, 1),
            ('[', _) => (Tok::LBracket, 1),
            (']', _) => (Tok::RBracket, 1),
            ('+' | '/' | '%', _) => (Tok::Arith(c), 1),
            _ => {
                return Err(QueryError::Syntax {
                    position: start + 1,
                    expected: "a property path, a literal, an operator or a keyword".to_string(),
                    found: format!("the character `{c}`"),
                });
            }
        };
        self.i += len;
        Ok(self.token(tok, start))
    }

    /// `[[name]]`: a property name quoted so it may hold characters a plain name may not (IoT
    /// Hub's `configurations.[[my-config]].status`). Read as a plain name.
    fn bracketed_name(&mut self, start: usize) -> Result<Token, QueryError> {
        self.i += 2;
        let name_start = self.i;
        while self.i < self.chars.len() && !(self.chars[self.i] == ']' && self.peek_at(1) == Some(']')) {
            self.i += 1;
        }
        if self.i >= self.chars.len() {
            return Err(QueryError::Syntax {
                position: start + 1,
                expected: "`]]` to close the `[[` name".to_string(),
                found: "the end of the query".to_string(),
            });
        }
        let name: String = self.chars[name_start..self.i].iter().collect();
        self.i += 2;
        if name.is_empty() {
            return Err(QueryError::Syntax {
                position: start + 1,
                expected: "a property name inside `[[ ]]`".to_string(),
                found: "`[[]]`".to_string(),
            });
        }
        Ok(self.token(Tok::Ident(name), start))
    }

    fn number(&mut self, start: usize) -> Result<Token, QueryError> {
        let value = if self.peek_at(0) == Some('0') && matches!(self.peek_at(1), Some('x' | 'X')) {
            self.i += 2;
            self.skip_while(|c| c.is_ascii_hexdigit());
            let digits: String = self.chars[start + 2..self.i].iter().collect();
            u64::from_str_radix(&digits, 16).ok().map(|v| v as f64)
        } else {
            self.decimal_digits();
            self.source(start).parse::<f64>().ok()
        };
        if self.peek_at(0).is_some_and(is_ident_char) {
            self.skip_while(is_ident_char);
            return Err(self.bad_number(start));
        }
        match value {
            Some(v) if v.is_finite() => Ok(self.token(Tok::Number(v), start)),
            _ => Err(self.bad_number(start)),
        }
    }

    /// Consumes `123`, `123.45`, `1e9`, `1.5E-3` (the integer part is already known to start).
    fn decimal_digits(&mut self) {
        self.skip_while(|c| c.is_ascii_digit());
        if self.peek_at(0) == Some('.') && self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
            self.skip_while(|c| c.is_ascii_digit());
        }
        if matches!(self.peek_at(0), Some('e' | 'E')) {
            let sign = usize::from(matches!(self.peek_at(1), Some('+' | '-')));
            if self.peek_at(1 + sign).is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1 + sign;
                self.skip_while(|c| c.is_ascii_digit());
            }
        }
    }

    fn skip_while(&mut self, keep: impl Fn(char) -> bool) {
        while self.peek_at(0).is_some_and(&keep) {
            self.i += 1;
        }
    }

    fn bad_number(&self, start: usize) -> QueryError {
        QueryError::Syntax {
            position: start + 1,
            expected: "a number such as 42, -7, 2.5, 1e3 or 0x1F".to_string(),
            found: format!("`{}`", shorten(&self.source(start))),
        }
    }

    /// Reads a string quoted with `quote`. The quote is escaped by doubling it (`'it''s'`) or with
    /// a backslash; `\\` and `\uXXXX` are also understood.
    fn string(&mut self, start: usize, quote: char) -> Result<Token, QueryError> {
        self.i += 1;
        let mut value = String::new();
        loop {
            let Some(c) = self.peek_at(0) else {
                return Err(QueryError::Syntax {
                    position: start + 1,
                    expected: format!("a closing {quote} for the string that starts here"),
                    found: "the end of the query".to_string(),
                });
            };
            self.i += 1;
            if c == quote {
                if self.peek_at(0) != Some(quote) {
                    return Ok(self.token(Tok::Str(value), start));
                }
                self.i += 1;
                value.push(quote);
            } else if c == '\\' {
                value.push(self.escape()?);
            } else {
                value.push(c);
            }
        }
    }

    /// Resolves the escape after a backslash (the backslash is already consumed).
    fn escape(&mut self) -> Result<char, QueryError> {
        let at = self.i;
        let c = self.peek_at(0);
        self.i += 1;
        match c {
            Some(c @ ('\'' | '"' | '\\' | '/')) => Ok(c),
            Some('u') => {
                let hex: String = self.chars.iter().skip(self.i).take(4).collect();
                let decoded = (hex.len() == 4)
                    .then(|| u32::from_str_radix(&hex, 16).ok())
                    .flatten()
                    .and_then(char::from_u32);
                self.i += 4;
                decoded.ok_or_else(|| bad_escape(at, &format!("\\u{hex}")))
            }
            Some(other) => Err(bad_escape(at, &format!("\\{other}"))),
            None => Err(bad_escape(at, "\\")),
        }
    }
}

fn bad_escape(at: usize, found: &str) -> QueryError {
    QueryError::Syntax {
        position: at,
        expected: "an escape \\' \\\" \\\\ or \\uXXXX (or a doubled quote) inside the string".to_string(),
        found: format!("`{found}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(text: &str) -> Vec<Tok> {
        tokenize(text).unwrap().into_iter().map(|t| t.tok).collect()
    }

    fn ident(s: &str) -> Tok {
        Tok::Ident(s.to_string())
    }

    #[test]
    fn splits_paths_operators_and_literals() {
        assert_eq!(
            toks("tags.$x>=-2.5<>'a'"),
            vec![
                ident("tags"),
                Tok::Dot,
                ident("$x"),
                Tok::Op(CmpOp::Ge),
                Tok::Minus,
                Tok::Number(2.5),
                Tok::Op(CmpOp::Ne),
                Tok::Str("a".into()),
                Tok::Eof
            ]
        );
        assert_eq!(
            toks("a!=1 <2 >3 <=4 =5"),
            vec![
                ident("a"),
                Tok::Op(CmpOp::Ne),
                Tok::Number(1.0),
                Tok::Op(CmpOp::Lt),
                Tok::Number(2.0),
                Tok::Op(CmpOp::Gt),
                Tok::Number(3.0),
                Tok::Op(CmpOp::Le),
                Tok::Number(4.0),
                Tok::Op(CmpOp::Eq),
                Tok::Number(5.0),
                Tok::Eof
            ]
        );
    }

    #[test]
    fn numbers_in_all_forms() {
        assert_eq!(toks("0x1F")[0], Tok::Number(31.0));
        assert_eq!(toks("1e3")[0], Tok::Number(1000.0));
        assert_eq!(toks("1.5E-1")[0], Tok::Number(0.15));
        // `1.` followed by a letter is a number then a dot, not a decimal.
        assert_eq!(toks("1.a")[..3], [Tok::Number(1.0), Tok::Dot, ident("a")]);
        assert!(tokenize("12abc").is_err());
        assert!(tokenize("0x").is_err());
    }

    #[test]
    fn string_escapes() {
        assert_eq!(toks("'it''s'")[0], Tok::Str("it's".into()));
        assert_eq!(toks(r#""say ""hi""""#)[0], Tok::Str(r#"say "hi""#.into()));
        assert_eq!(toks(r"'a\'b\\c\u0041'")[0], Tok::Str(r"a'b\cA".into()));
        assert_eq!(toks(r#"'"'"#)[0], Tok::Str("\"".into()));
        assert_eq!(toks("'ünï'")[0], Tok::Str("ünï".into()));
    }

    #[test]
    fn positions_count_characters_not_bytes() {
        let tokens = tokenize("'éé' x").unwrap();
        assert_eq!(tokens[1].pos, 6);
        assert_eq!(tokens[2].pos, 7);
    }

    #[test]
    fn lexical_errors_name_position() {
        let err = tokenize("a = 'open").unwrap_err().to_string();
        assert!(err.contains("character 5"), "{err}");
        assert!(err.contains("closing '"), "{err}");
        let err = tokenize("a ; b").unwrap_err().to_string();
        assert!(err.contains("character 3") && err.contains("`;`"), "{err}");
        let err = tokenize(r"'bad \q'").unwrap_err().to_string();
        assert!(err.contains(r"\q"), "{err}");
        let err = tokenize(r"'\u12'").unwrap_err().to_string();
        assert!(err.contains("escape"), "{err}");
    }
}
