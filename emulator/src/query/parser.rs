//! Recursive-descent parser from [`Token`]s to a [`Query`].
//!
//! Precedence, loosest first: `OR`, `AND`, `NOT`, then predicates (comparison, `IN`/`NIN`,
//! `IS_DEFINED`, parenthesised conditions). Every error names the 1-based character position
//! and what would have been accepted there, because the message is returned to the user.
//! Constructs IoT Hub has but the emulator lacks are reported as `Unsupported`, not as syntax
//! errors, so users know their query is fine and the emulator is the limit.

use super::lexer::{Tok, Token};
use super::{CmpOp, Collection, Expr, Field, Literal, Operand, Path, Query, QueryError, Select};

/// Output key of `COUNT()` when the query gives no `AS` alias.
pub(super) const DEFAULT_COUNT_ALIAS: &str = "$1";

/// Deepest nesting of parentheses and `NOT`s accepted; bounds recursion on hostile input.
pub(super) const MAX_DEPTH: usize = 64;

/// Words that cannot start a property path or be used as an alias.
const RESERVED: &[&str] = &[
    "SELECT", "TOP", "FROM", "WHERE", "AND", "OR", "NOT", "IN", "NIN", "AS", "GROUP", "ORDER", "BY", "TRUE",
    "FALSE", "NULL",
];

const CONDITION: &str = "a condition (a property path, a literal, NOT, IS_DEFINED(...) or `(`)";
const COMPARISON: &str = "a comparison operator (=, !=, <>, <, >, <=, >=), IN or NIN";
const LITERAL: &str = "a literal (a 'string', a number, true, false or null)";

/// Parses a whole query; `tokens` ends with [`Tok::Eof`].
pub(super) fn parse(tokens: Vec<Token>) -> Result<Query, QueryError> {
    let mut parser = Parser { tokens, i: 0, depth: 0 };
    parser.query()
}

struct Parser {
    tokens: Vec<Token>,
    i: usize,
    depth: usize,
}

type Parsed<T> = Result<T, QueryError>;

impl Parser {
    fn peek(&self) -> &Token {
        self.peek_at(0)
    }

    /// The token `offset` places ahead; the final `Eof` repeats past the end.
    fn peek_at(&self, offset: usize) -> &Token {
        let last = self.tokens.len().saturating_sub(1);
        &self.tokens[(self.i + offset).min(last)]
    }

    fn at_keyword(&self, keyword: &str) -> bool {
        is_keyword(self.peek(), keyword)
    }

    fn eat_keyword(&mut self, keyword: &str) -> bool {
        let found = self.at_keyword(keyword);
        if found {
            self.i += 1;
        }
        found
    }

    fn expect_keyword(&mut self, keyword: &str, expected: &str) -> Parsed<()> {
        if self.eat_keyword(keyword) { Ok(()) } else { Err(self.error(expected)) }
    }

    fn expect(&mut self, tok: &Tok, expected: &str) -> Parsed<()> {
        if &self.peek().tok == tok {
            self.i += 1;
            Ok(())
        } else {
            Err(self.error(expected))
        }
    }

    /// A syntax error at the next token.
    fn error(&self, expected: &str) -> QueryError {
        let token = self.peek();
        QueryError::Syntax { position: token.pos, expected: expected.to_string(), found: token.describe() }
    }

    fn query(&mut self) -> Parsed<Query> {
        self.expect_keyword("SELECT", "SELECT at the start of the query")?;
        let top = if self.eat_keyword("TOP") { Some(self.top()?) } else { None };
        let select = self.select()?;
        self.expect_keyword("FROM", "FROM after the selection")?;
        let collection = self.from()?;
        let filter = if self.eat_keyword("WHERE") { Some(self.or()?) } else { None };
        self.end(filter.is_some())?;
        Ok(Query { top, select, filter, collection })
    }

    /// Checks that nothing but the end of the query follows.
    fn end(&self, had_where: bool) -> Parsed<()> {
        for clause in ["GROUP", "ORDER"] {
            if self.at_keyword(clause) {
                return Err(self.unsupported(format!("{clause} BY")));
            }
        }
        match (&self.peek().tok, had_where) {
            (Tok::Eof, _) => Ok(()),
            (_, true) => Err(self.error("AND, OR or the end of the query")),
            (_, false) => Err(self.error("WHERE or the end of the query")),
        }
    }

    fn unsupported(&self, construct: String) -> QueryError {
        QueryError::Unsupported { construct, position: self.peek().pos }
    }

    fn top(&mut self) -> Parsed<usize> {
        let expected = "a whole number of results after TOP, such as TOP 10";
        let token = self.peek();
        let is_integer = token.text.bytes().all(|b| b.is_ascii_digit());
        match token.tok {
            Tok::Number(_) if is_integer => {
                let n = token.text.parse::<usize>().map_err(|_| self.error(expected))?;
                self.i += 1;
                Ok(n)
            }
            _ => Err(self.error(expected)),
        }
    }

    fn from(&mut self) -> Parsed<Collection> {
        if !self.at_keyword("devices") {
            return Err(self.error("`devices` after FROM (the collection of device twins)"));
        }
        self.i += 1;
        if self.peek().tok != Tok::Dot {
            return Ok(Collection::Devices);
        }
        let next = self.peek_at(1);
        if is_keyword(next, "modules") {
            self.i += 2;
            return Ok(Collection::Modules);
        }
        if is_keyword(next, "jobs") {
            self.i += 1;
            return Err(self.unsupported("FROM devices.jobs".to_string()));
        }
        self.i += 1;
        Err(self.error("`modules` or `jobs` after `devices.`"))
    }

    fn select(&mut self) -> Parsed<Select> {
        if self.peek().tok == Tok::Star {
            self.i += 1;
            return Ok(Select::All);
        }
        if self.at_function() && is_keyword(self.peek(), "COUNT") {
            return self.count();
        }
        let mut fields: Vec<Field> = Vec::new();
        loop {
            let field = self.field()?;
            if fields.iter().any(|f| f.key == field.key) {
                return Err(QueryError::DuplicateKey { key: field.key });
            }
            fields.push(field);
            if self.peek().tok != Tok::Comma {
                return Ok(Select::Fields(fields));
            }
            self.i += 1;
        }
    }

    /// Whether the next tokens are `name (`.
    fn at_function(&self) -> bool {
        matches!(self.peek().tok, Tok::Ident(_)) && self.peek_at(1).tok == Tok::LParen
    }

    fn count(&mut self) -> Parsed<Select> {
        self.i += 2;
        self.expect(&Tok::RParen, "`)` right after COUNT( (COUNT takes no argument)")?;
        let alias = match self.alias()? {
            Some(alias) => alias,
            None => DEFAULT_COUNT_ALIAS.to_string(),
        };
        if self.peek().tok == Tok::Comma {
            return Err(self.unsupported("COUNT() together with other projections".to_string()));
        }
        Ok(Select::Count { alias })
    }

    fn field(&mut self) -> Parsed<Field> {
        if self.at_function() {
            let name = self.peek().text.to_ascii_uppercase();
            return Err(match name.as_str() {
                "COUNT" => self.unsupported("COUNT() together with other projections".into()),
                "AVG" | "SUM" | "MIN" | "MAX" => self.unsupported(format!("the aggregate {name}()")),
                _ => self.unsupported(format!("the function {name}() in SELECT")),
            });
        }
        let path = self.path("`*`, COUNT() or a property path such as tags.location")?;
        let key = match self.alias()? {
            Some(alias) => alias,
            None => path.last().to_string(),
        };
        Ok(Field { path, key })
    }

    /// An optional `AS name`.
    fn alias(&mut self) -> Parsed<Option<String>> {
        if !self.eat_keyword("AS") {
            return Ok(None);
        }
        match &self.peek().tok {
            Tok::Ident(name) if !is_reserved(name) => {
                let name = name.clone();
                self.i += 1;
                Ok(Some(name))
            }
            _ => Err(self.error("a name after AS")),
        }
    }

    /// A dotted path; the first segment may not be a keyword, later ones may.
    fn path(&mut self, expected: &str) -> Parsed<Path> {
        let mut segments = match &self.peek().tok {
            Tok::Ident(name) if !is_reserved(name) => vec![name.clone()],
            _ => return Err(self.error(expected)),
        };
        self.i += 1;
        while self.peek().tok == Tok::Dot {
            self.i += 1;
            match &self.peek().tok {
                Tok::Ident(name) => segments.push(name.clone()),
                _ => return Err(self.error("a property name after `.`")),
            }
            self.i += 1;
        }
        if segments.len() > 1 && segments[0].eq_ignore_ascii_case("devices") {
            segments.remove(0);
            // `devices.modules.moduleId`: how module queries name a module twin's properties.
            if segments.len() > 1 && segments[0].eq_ignore_ascii_case("modules") {
                segments.remove(0);
            }
        }
        Ok(Path::new(segments))
    }

    /// Tracks nesting so hostile input cannot overflow the stack.
    fn descend(&mut self) -> Parsed<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(QueryError::TooDeep { max: MAX_DEPTH, position: self.peek().pos });
        }
        Ok(())
    }

    fn or(&mut self) -> Parsed<Expr> {
        let mut left = self.and()?;
        while self.eat_keyword("OR") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Parsed<Expr> {
        let mut left = self.not()?;
        while self.eat_keyword("AND") {
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Parsed<Expr> {
        if !self.at_keyword("NOT") {
            return self.predicate();
        }
        self.i += 1;
        self.descend()?;
        let inner = self.not()?;
        self.depth -= 1;
        Ok(Expr::Not(Box::new(inner)))
    }

    fn predicate(&mut self) -> Parsed<Expr> {
        if self.peek().tok == Tok::LParen {
            return self.parenthesised();
        }
        if self.at_function() {
            return self.function();
        }
        let operand = self.operand(CONDITION)?;
        self.after_operand(operand)
    }

    fn parenthesised(&mut self) -> Parsed<Expr> {
        let open = self.peek().pos;
        self.i += 1;
        self.descend()?;
        let inner = self.or()?;
        self.depth -= 1;
        let expected = format!("AND, OR or `)` to close the `(` at character {open}");
        self.expect(&Tok::RParen, &expected)?;
        Ok(inner)
    }

    fn function(&mut self) -> Parsed<Expr> {
        let name = self.peek().text.to_ascii_uppercase();
        if name != "IS_DEFINED" {
            return Err(self.unsupported(format!("the function {name}()")));
        }
        self.i += 2;
        let path = self.path("a property path inside IS_DEFINED( )")?;
        self.expect(&Tok::RParen, "`)` to close IS_DEFINED(")?;
        Ok(Expr::IsDefined(path))
    }

    /// What may follow the first operand of a predicate.
    fn after_operand(&mut self, operand: Operand) -> Parsed<Expr> {
        if let Tok::Op(op) = self.peek().tok {
            self.i += 1;
            let right = self.operand(&format!("a property path or a literal after {op}"))?;
            self.reject_arithmetic()?;
            return Ok(Expr::Compare { left: operand, op, right });
        }
        let negated = if self.eat_keyword("IN") {
            false
        } else if self.eat_keyword("NIN") {
            true
        } else if self.at_keyword("NOT") && is_keyword(self.peek_at(1), "IN") {
            self.i += 2;
            true
        } else {
            self.reject_arithmetic()?;
            return self.bare(operand);
        };
        let list = self.list()?;
        Ok(Expr::In { operand, list, negated })
    }

    /// An operand alone is a condition only where the condition may end.
    fn bare(&self, operand: Operand) -> Parsed<Expr> {
        let ends = matches!(self.peek().tok, Tok::Eof | Tok::RParen)
            || ["AND", "OR", "GROUP", "ORDER"].iter().any(|k| self.at_keyword(k));
        if ends { Ok(Expr::Value(operand)) } else { Err(self.error(COMPARISON)) }
    }

    fn reject_arithmetic(&self) -> Parsed<()> {
        match self.peek().tok {
            Tok::Arith(_) | Tok::Star | Tok::Minus => {
                Err(self.unsupported(format!("the arithmetic operator `{}`", self.peek().text)))
            }
            Tok::LBracket => Err(self.unsupported("indexing with `[...]`".to_string())),
            _ => Ok(()),
        }
    }

    fn operand(&mut self, expected: &str) -> Parsed<Operand> {
        if let Some(literal) = self.literal()? {
            return Ok(Operand::Literal(literal));
        }
        if self.at_function() {
            let name = self.peek().text.to_ascii_uppercase();
            return Err(self.unsupported(format!("the function {name}() as a comparison operand")));
        }
        Ok(Operand::Path(self.path(expected)?))
    }

    /// A literal if one comes next; `Ok(None)` leaves the token for the caller.
    fn literal(&mut self) -> Parsed<Option<Literal>> {
        let literal = match &self.peek().tok {
            Tok::Str(s) => Literal::String(s.clone()),
            Tok::Number(n) => Literal::Number(*n),
            Tok::Minus => return self.negative().map(Some),
            _ if self.at_keyword("TRUE") => Literal::Bool(true),
            _ if self.at_keyword("FALSE") => Literal::Bool(false),
            _ if self.at_keyword("NULL") => Literal::Null,
            _ => return Ok(None),
        };
        self.i += 1;
        Ok(Some(literal))
    }

    fn negative(&mut self) -> Parsed<Literal> {
        self.i += 1;
        match self.peek().tok {
            Tok::Number(n) => {
                self.i += 1;
                Ok(Literal::Number(-n))
            }
            _ => Err(self.error("a number after `-`")),
        }
    }

    /// `[ literal, ... ]` after IN / NIN.
    fn list(&mut self) -> Parsed<Vec<Literal>> {
        self.expect(&Tok::LBracket, "`[` to start the list, as in IN ['a', 'b']")?;
        let mut items = Vec::new();
        if self.peek().tok == Tok::RBracket {
            self.i += 1;
            return Ok(items);
        }
        loop {
            match self.literal()? {
                Some(literal) => items.push(literal),
                None => return Err(self.error(&format!("{LITERAL} in the list"))),
            }
            match self.peek().tok {
                Tok::Comma => self.i += 1,
                Tok::RBracket => {
                    self.i += 1;
                    return Ok(items);
                }
                _ => return Err(self.error("`,` or `]` in the list")),
            }
        }
    }
}

fn is_keyword(token: &Token, keyword: &str) -> bool {
    matches!(&token.tok, Tok::Ident(name) if name.eq_ignore_ascii_case(keyword))
}

fn is_reserved(name: &str) -> bool {
    RESERVED.iter().any(|k| name.eq_ignore_ascii_case(k))
}

impl std::fmt::Display for CmpOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Gt => ">",
            CmpOp::Le => "<=",
            CmpOp::Ge => ">=",
        })
    }
}
