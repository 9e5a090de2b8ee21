//! The subset of the IoT Hub query language that `POST /devices/query` accepts, parsed once and
//! evaluated against twin JSON documents (reference §2.5 and §2.8).
//!
//! Pure code with no I/O or hub state: the registry hands each twin to [`Query::matches`] and
//! [`Query::project`] (or to [`Query::run`]) and does its own paging, so a query over a million
//! devices allocates nothing per non-matching device.
//!
//! Supported: `SELECT [TOP n] * | COUNT() [AS a] | path [AS a], ... FROM devices[.modules]
//! [WHERE cond]`. Conditions use `= != <> < > <= >=`, `AND`/`OR`/`NOT`, parentheses, `IN [...]`,
//! `NIN [...]`, `NOT IN [...]` and `IS_DEFINED(path)`. Keywords are case-insensitive; property
//! names are not. `FROM devices.jobs`, `GROUP BY`, `ORDER BY`, `AVG`/`SUM`/`MIN`/`MAX`,
//! other functions and arithmetic return [`QueryError::Unsupported`].
//!
//! Semantics, chosen to follow the SQL-like model IoT Hub inherits (see [`Truth`]):
//! - Comparisons only hold between primitive values of the same kind (numbers as `f64`,
//!   strings by code point, booleans with `false < true`, `null = null`). A missing property,
//!   an object or array, or two different kinds make the comparison *undefined*.
//! - Undefined is neither true nor false: `NOT (tags.x = 1)` does not match a device without
//!   `tags.x` (nor one where `tags.x` is a string). Only true conditions select a device.
//! - `x IN [..]` is true when `x` equals a list element of the same kind, false when `x` is a
//!   primitive equal to none of them, undefined when `x` is missing or not primitive. `NIN` and
//!   `NOT IN` negate that, so they do not match devices that lack `x` either.
//! - `IS_DEFINED(p)` is true when the property exists, even if its value is `null`.
//! - A bare operand used as a condition (`WHERE tags.vip`) is true only for the boolean `true`.
//! - `COUNT()` without `AS` is returned under the key `$1` (the Cosmos DB convention IoT Hub's
//!   query engine follows; **unconfirmed** against a live hub).

mod eval;
mod lexer;
mod parser;

use serde_json::{Map, Value};

pub use eval::Truth;

/// A parsed twin query, ready to be evaluated against any number of twins.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// `TOP n`: the most results to return, if given.
    pub top: Option<usize>,
    /// What each result looks like.
    pub select: Select,
    /// The `WHERE` condition; `None` selects every twin.
    pub filter: Option<Expr>,
    /// What the query runs over (`FROM devices` or `FROM devices.modules`).
    pub collection: Collection,
}

/// The collection a query reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Collection {
    /// `FROM devices`: device twins.
    #[default]
    Devices,
    /// `FROM devices.modules`: module twins.
    Modules,
}

/// The `SELECT` list.
#[derive(Debug, Clone, PartialEq)]
pub enum Select {
    /// `SELECT *`: whole twins.
    All,
    /// `SELECT COUNT() [AS alias]`: one row `{alias: n}` for the whole result.
    Count {
        /// The output key (`$1` when the query gave no alias).
        alias: String,
    },
    /// `SELECT a.b, c AS d`: one object per twin holding the listed properties.
    Fields(Vec<Field>),
}

/// One projected property and the key it is returned under.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// Where the value comes from in the twin.
    pub path: Path,
    /// The key in the result object: the `AS` alias, else the last path segment.
    pub key: String,
}

/// A dotted property path into the twin, such as `properties.reported.$version`.
/// A leading `devices.` (or `devices.modules.`) is stripped at parse time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    segments: Vec<String>,
}

impl Path {
    /// Builds a path from its segments (at least one).
    pub fn new(segments: Vec<String>) -> Self {
        Path { segments }
    }

    /// The property names from the root down.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The value at this path, or `None` when some segment is missing or not an object.
    pub fn lookup<'a>(&self, twin: &'a Value) -> Option<&'a Value> {
        self.segments.iter().try_fold(twin, |value, segment| value.as_object()?.get(segment))
    }

    fn last(&self) -> &str {
        self.segments.last().map_or("", String::as_str)
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.segments.join("."))
    }
}

/// A constant written in the query.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Null,
    Bool(bool),
    /// Every number, integer or not, is kept and compared as `f64`.
    Number(f64),
    String(String),
}

/// One side of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Path(Path),
    Literal(Literal),
}

/// A comparison operator (`<>` and `!=` are both [`CmpOp::Ne`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

/// A `WHERE` condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    /// `left op right`.
    Compare {
        left: Operand,
        op: CmpOp,
        right: Operand,
    },
    /// `operand IN [..]`, or `NIN` / `NOT IN` when `negated`.
    In {
        operand: Operand,
        list: Vec<Literal>,
        negated: bool,
    },
    /// `IS_DEFINED(path)`.
    IsDefined(Path),
    /// An operand standing alone as a condition; true only when it is the boolean `true`.
    Value(Operand),
}

fn push_root<'a>(path: &'a Path, roots: &mut Vec<&'a str>) {
    if let Some(first) = path.segments().first()
        && !roots.contains(&first.as_str())
    {
        roots.push(first);
    }
}

impl Expr {
    fn collect_roots<'a>(&'a self, roots: &mut Vec<&'a str>) {
        let operand = |o: &'a Operand, roots: &mut Vec<&'a str>| {
            if let Operand::Path(p) = o {
                push_root(p, roots);
            }
        };
        match self {
            Expr::Or(a, b) | Expr::And(a, b) => {
                a.collect_roots(roots);
                b.collect_roots(roots);
            }
            Expr::Not(e) => e.collect_roots(roots),
            Expr::Compare { left, right, .. } => {
                operand(left, roots);
                operand(right, roots);
            }
            Expr::In { operand: o, .. } | Expr::Value(o) => operand(o, roots),
            Expr::IsDefined(p) => push_root(p, roots),
        }
    }
}

/// Why a query was refused. Every message is meant to be shown to the caller as is
/// (HTTP 400 body), so it says where the problem is and what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The query text is longer than [`crate::limits::QUERY_MAX_CHARS`].
    #[error("the query is {length} characters long; IoT Hub accepts at most {max}")]
    TooLong { length: usize, max: usize },
    /// The text does not follow the grammar.
    #[error("syntax error at character {position}: expected {expected}, found {found}")]
    Syntax {
        /// 1-based character position of the offending token.
        position: usize,
        expected: String,
        found: String,
    },
    /// Valid IoT Hub syntax that this emulator does not implement.
    #[error("{construct} (at character {position}) is not supported by this emulator")]
    Unsupported { construct: String, position: usize },
    /// Two projections would produce the same key in the result objects.
    #[error("two projections are both returned as `{key}`; give one of them a different name with AS")]
    DuplicateKey { key: String },
    /// Parentheses or `NOT`s nested deeper than the parser allows.
    #[error("the condition is nested more than {max} levels deep (at character {position})")]
    TooDeep { max: usize, position: usize },
}

impl Query {
    /// Parses query text such as `SELECT * FROM devices WHERE tags.region = 'US'`.
    pub fn parse(text: &str) -> Result<Query, QueryError> {
        let length = text.chars().count();
        let max = crate::limits::QUERY_MAX_CHARS;
        if length > max {
            return Err(QueryError::TooLong { length, max });
        }
        parser::parse(lexer::tokenize(text)?)
    }

    /// Whether `twin` satisfies the `WHERE` condition (undefined counts as no).
    pub fn matches(&self, twin: &Value) -> bool {
        self.filter.as_ref().is_none_or(|expr| expr.eval(twin) == Truth::True)
    }

    /// The result item for one matching twin: the twin itself for `SELECT *`, an object of the
    /// selected properties for a field list (missing properties are left out). For `COUNT()`,
    /// which has no per-twin item, the twin is returned unchanged; use [`Query::count_row`].
    pub fn project(&self, twin: &Value) -> Value {
        match &self.select {
            Select::All | Select::Count { .. } => twin.clone(),
            Select::Fields(fields) => {
                let object: Map<String, Value> = fields
                    .iter()
                    .filter_map(|f| Some((f.key.clone(), f.path.lookup(twin)?.clone())))
                    .collect();
                Value::Object(object)
            }
        }
    }

    /// The top-level twin properties the `WHERE` condition reads (`tags`, `deviceId`, …), so a
    /// caller can build only those parts of each twin before filtering. Empty without `WHERE`.
    pub fn filter_roots(&self) -> Vec<&str> {
        let mut roots = Vec::new();
        if let Some(expr) = &self.filter {
            expr.collect_roots(&mut roots);
        }
        roots
    }

    /// The top-level twin properties a matching twin's result item needs: `None` for the whole
    /// twin (`SELECT *`), none at all for `COUNT()`.
    pub fn select_roots(&self) -> Option<Vec<&str>> {
        match &self.select {
            Select::All => None,
            Select::Count { .. } => Some(Vec::new()),
            Select::Fields(fields) => {
                let mut roots = Vec::new();
                for f in fields {
                    push_root(&f.path, &mut roots);
                }
                Some(roots)
            }
        }
    }

    /// Whether the query aggregates (`COUNT()`) instead of returning one item per twin.
    pub fn is_count(&self) -> bool {
        matches!(self.select, Select::Count { .. })
    }

    /// The single result row of a `COUNT()` query that matched `count` twins, such as
    /// `{"total": 3}`. For other queries the key is `$1`.
    pub fn count_row(&self, count: usize) -> Value {
        let key = match &self.select {
            Select::Count { alias } => alias.as_str(),
            _ => parser::DEFAULT_COUNT_ALIAS,
        };
        let mut row = Map::new();
        row.insert(key.to_string(), Value::from(count));
        Value::Object(row)
    }

    /// The `x-ms-item-type` to answer with: `Twin` for whole twins, `Raw` for projections and
    /// counts (the casing C# parses, see reference §2.5).
    pub fn item_type(&self) -> &'static str {
        match self.select {
            Select::All => "Twin",
            _ => "Raw",
        }
    }

    /// Evaluates the query over `twins` in order: filter, then projection or count, then `TOP`
    /// (which limits result rows, so it never changes a count). Paging is the caller's business;
    /// this is the whole result.
    pub fn run<'a>(&self, twins: impl IntoIterator<Item = &'a Value>) -> Vec<Value> {
        let limit = self.top.unwrap_or(usize::MAX);
        let matching = twins.into_iter().filter(|twin| self.matches(twin));
        if self.is_count() {
            let row = self.count_row(matching.count());
            return std::iter::once(row).take(limit).collect();
        }
        matching.take(limit).map(|twin| self.project(twin)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    #[test]
    fn roots_name_the_top_level_properties_read() {
        let q = Query::parse("SELECT deviceId, properties.reported.v FROM devices WHERE tags.a = 1 AND (NOT status = 'x' OR IS_DEFINED(tags.b))").unwrap();
        assert_eq!(q.filter_roots(), vec!["tags", "status"]);
        assert_eq!(q.select_roots(), Some(vec!["deviceId", "properties"]));
        assert_eq!(Query::parse("SELECT * FROM devices").unwrap().select_roots(), None);
        assert!(Query::parse("SELECT COUNT() FROM devices").unwrap().filter_roots().is_empty());
    }

    /// Three twins shaped like reference §2.8.
    fn twins() -> Vec<Value> {
        vec![
            json!({
                "deviceId": "devA", "status": "enabled", "connectionState": "Connected",
                "cloudToDeviceMessageCount": 0, "version": 4,
                "tags": {"location": {"region": "US", "plant": "Redmond43"}, "floor": 3,
                         "vip": true, "owner": "it's me", "optional": null},
                "properties": {
                    "desired": {"$version": 2},
                    "reported": {"appVersion": "1.2.0", "temp": 21.5, "$version": 4}
                }
            }),
            json!({
                "deviceId": "devB", "status": "disabled", "connectionState": "Disconnected",
                "cloudToDeviceMessageCount": 7, "version": 2,
                "tags": {"location": {"region": "EU"}, "floor": 1, "vip": false},
                "properties": {
                    "desired": {"$version": 1},
                    "reported": {"appVersion": "1.0.0", "temp": -3, "$version": 2}
                }
            }),
            json!({
                "deviceId": "devC", "status": "enabled", "connectionState": "Disconnected",
                "cloudToDeviceMessageCount": 2, "version": 1,
                "tags": {"floor": "3"},
                "properties": {"desired": {"$version": 1}, "reported": {"$version": 1}}
            }),
        ]
    }

    /// The ids of the devices `text` matches.
    fn ids(text: &str) -> Vec<String> {
        let query = Query::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        twins()
            .iter()
            .filter(|t| query.matches(t))
            .map(|t| t["deviceId"].as_str().unwrap().to_string())
            .collect()
    }

    fn err(text: &str) -> String {
        Query::parse(text).expect_err(&format!("{text} should be refused")).to_string()
    }

    #[test]
    fn table_of_queries_and_matching_devices() {
        let table: &[(&str, &[&str])] = &[
            ("SELECT * FROM devices", &["devA", "devB", "devC"]),
            ("select * from devices where tags.location.region = 'US'", &["devA"]),
            ("SELECT * FROM devices WHERE devices.tags.location.region = \"EU\"", &["devB"]),
            ("SELECT * FROM devices WHERE 'US' = tags.location.region", &["devA"]),
            ("SELECT * FROM devices WHERE tags.floor >= 1", &["devA", "devB"]),
            ("SELECT * FROM devices WHERE tags.floor = '3'", &["devC"]),
            ("SELECT * FROM devices WHERE tags.floor != 3", &["devB"]),
            ("SELECT * FROM devices WHERE tags.floor <> 3", &["devB"]),
            ("SELECT * FROM devices WHERE tags.floor < 3", &["devB"]),
            ("SELECT * FROM devices WHERE tags.floor > 1", &["devA"]),
            ("SELECT * FROM devices WHERE tags.floor <= 3.0", &["devA", "devB"]),
            ("SELECT * FROM devices WHERE properties.reported.temp < -2.5", &["devB"]),
            ("SELECT * FROM devices WHERE properties.reported.temp > -1e1", &["devA", "devB"]),
            ("SELECT * FROM devices WHERE cloudToDeviceMessageCount > 0x1", &["devB", "devC"]),
            ("SELECT * FROM devices WHERE properties.reported.$version = 4", &["devA"]),
            ("SELECT * FROM devices WHERE properties.reported.appVersion >= '1.1'", &["devA"]),
            ("SELECT * FROM devices WHERE tags.vip = true", &["devA"]),
            ("SELECT * FROM devices WHERE tags.vip = FALSE", &["devB"]),
            ("SELECT * FROM devices WHERE tags.vip", &["devA"]),
            ("SELECT * FROM devices WHERE tags.optional = null", &["devA"]),
            ("SELECT * FROM devices WHERE tags.owner = 'it''s me'", &["devA"]),
            ("SELECT * FROM devices WHERE status = 'enabled' AND tags.floor = 3", &["devA"]),
            ("SELECT * FROM devices WHERE status = 'disabled' OR tags.floor = '3'", &["devB", "devC"]),
            ("SELECT * FROM devices WHERE version = properties.reported.$version", &["devA", "devB", "devC"]),
            ("SELECT * FROM devices WHERE deviceId IN ['devA', 'devC']", &["devA", "devC"]),
            ("SELECT * FROM devices WHERE deviceId NIN ['devA', 'devC']", &["devB"]),
            ("SELECT * FROM devices WHERE deviceId NOT IN ['devA']", &["devB", "devC"]),
            ("SELECT * FROM devices WHERE tags.floor IN [1, '3']", &["devB", "devC"]),
            ("SELECT * FROM devices WHERE tags.floor IN []", &[]),
            ("SELECT * FROM devices WHERE IS_DEFINED(tags.location)", &["devA", "devB"]),
            ("SELECT * FROM devices WHERE is_defined(tags.optional)", &["devA"]),
            ("SELECT * FROM devices WHERE NOT is_defined(tags.location)", &["devC"]),
            ("SELECT * FROM devices WHERE tags.deviceId = 'devA'", &[]),
            ("SELECT * FROM devices WHERE deviceid = 'devA'", &[]),
        ];
        for (text, expected) in table {
            assert_eq!(ids(text), *expected, "{text}");
        }
    }

    #[test]
    fn precedence_not_over_and_over_or() {
        // OR binds loosest: A OR (B AND C).
        let q = "SELECT * FROM devices WHERE deviceId = 'devC' OR tags.floor = 1 AND status = 'enabled'";
        assert_eq!(ids(q), ["devC"]);
        let q = "SELECT * FROM devices WHERE (deviceId = 'devC' OR tags.floor = 1) AND status = 'enabled'";
        assert_eq!(ids(q), ["devC"]);
        let q = "SELECT * FROM devices WHERE (deviceId = 'devC' OR tags.floor = 1) AND status = 'disabled'";
        assert_eq!(ids(q), ["devB"]);
        // NOT binds tighter than AND: (NOT A) AND B.
        let q = "SELECT * FROM devices WHERE NOT deviceId = 'devA' AND status = 'enabled'";
        assert_eq!(ids(q), ["devC"]);
        let q = "SELECT * FROM devices WHERE NOT (deviceId = 'devA' AND status = 'enabled')";
        assert_eq!(ids(q), ["devB", "devC"]);
        let q = "SELECT * FROM devices WHERE NOT NOT deviceId = 'devA'";
        assert_eq!(ids(q), ["devA"]);
        let parsed = Query::parse("SELECT * FROM devices WHERE a = 1 OR b = 2 AND NOT c = 3").unwrap();
        assert!(matches!(
            parsed.filter,
            Some(Expr::Or(_, ref rhs)) if matches!(**rhs, Expr::And(_, ref r) if matches!(**r, Expr::Not(_)))
        ));
    }

    #[test]
    fn undefined_survives_not() {
        // devC has no tags.location: neither the comparison nor its negation match it.
        assert_eq!(ids("SELECT * FROM devices WHERE tags.location.region = 'US'"), ["devA"]);
        assert_eq!(ids("SELECT * FROM devices WHERE NOT (tags.location.region = 'US')"), ["devB"]);
        // Type mismatch (devC's floor is a string) is undefined as well.
        assert_eq!(ids("SELECT * FROM devices WHERE NOT (tags.floor = 3)"), ["devB"]);
        // NIN does not match devices without the property.
        assert_eq!(ids("SELECT * FROM devices WHERE tags.location.region NIN ['US']"), ["devB"]);
        // Undefined OR true is true; undefined AND true is not.
        assert_eq!(
            ids("SELECT * FROM devices WHERE tags.location.region = 'US' OR deviceId = 'devC'"),
            ["devA", "devC"]
        );
        assert_eq!(
            ids("SELECT * FROM devices WHERE NOT (tags.location.region = 'X' AND deviceId = 'devC')"),
            ["devA", "devB"]
        );
        // Objects are not comparable, not even to themselves.
        assert_eq!(ids("SELECT * FROM devices WHERE tags.location = tags.location"), Vec::<String>::new());
    }

    #[test]
    fn keywords_are_case_insensitive() {
        let q = "sElEcT tOp 1 * FrOm DeViCeS wHeRe Is_DeFiNeD(tags.floor) aNd NoT tags.vip = TrUe aNd deviceId nIn ['devA'] oR deviceId iN ['devC']";
        let parsed = Query::parse(q).unwrap();
        assert_eq!(parsed.top, Some(1));
        assert_eq!(ids(q), ["devB", "devC"]);
    }

    #[test]
    fn top_limits_results() {
        let all = twins();
        let q = Query::parse("SELECT TOP 2 * FROM devices").unwrap();
        let out = q.run(&all);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], all[0]);
        assert_eq!(q.item_type(), "Twin");
        let q = Query::parse("SELECT TOP 1 * FROM devices WHERE status = 'enabled' AND deviceId != 'devA'")
            .unwrap();
        assert_eq!(q.run(&all)[0]["deviceId"], "devC");
        assert!(Query::parse("SELECT TOP 0 * FROM devices").unwrap().run(&all).is_empty());
    }

    #[test]
    fn count_with_and_without_alias() {
        let all = twins();
        let q =
            Query::parse("SELECT COUNT() AS numberOfDevices FROM devices WHERE status = 'enabled'").unwrap();
        assert_eq!(q.select, Select::Count { alias: "numberOfDevices".into() });
        assert_eq!(q.run(&all), [json!({"numberOfDevices": 2})]);
        assert_eq!(q.item_type(), "Raw");
        let q = Query::parse("select count() from devices").unwrap();
        assert_eq!(q.run(&all), [json!({"$1": 3})]);
        // TOP limits rows, not the count.
        let q = Query::parse("SELECT TOP 1 COUNT() AS n FROM devices").unwrap();
        assert_eq!(q.run(&all), [json!({"n": 3})]);
        assert!(q.is_count());
    }

    #[test]
    fn projections_use_last_segment_or_alias() {
        let all = twins();
        let q = Query::parse(
            "SELECT deviceId, properties.reported.appVersion, tags.location.region AS r FROM devices",
        )
        .unwrap();
        let out = q.run(&all);
        assert_eq!(out[0], json!({"deviceId": "devA", "appVersion": "1.2.0", "r": "US"}));
        // Missing properties are left out rather than set to null.
        assert_eq!(out[2], json!({"deviceId": "devC"}));
        let keys: Vec<&str> = out[0].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["deviceId", "appVersion", "r"]);
        let q = Query::parse("SELECT devices.properties.reported.$version FROM devices").unwrap();
        assert_eq!(q.project(&all[1]), json!({"$version": 2}));
    }

    #[test]
    fn paths_strip_devices_prefix_and_allow_dollar_and_keywords_after_dot() {
        let q = Query::parse("SELECT * FROM devices WHERE devices.tags.from.select = 1").unwrap();
        let Some(Expr::Compare { left: Operand::Path(path), .. }) = q.filter else {
            panic!("expected a comparison, got {:?}", q.filter);
        };
        assert_eq!(path.segments(), ["tags", "from", "select"]);
        assert_eq!(path.to_string(), "tags.from.select");
    }

    #[test]
    fn literals_parse_to_the_right_values() {
        let q = Query::parse(
            "SELECT * FROM devices WHERE x IN ['a''b', \"c\\\"d\", -4, 2.5, 0x10, true, false, null]",
        )
        .unwrap();
        let Some(Expr::In { list, negated: false, .. }) = q.filter else {
            panic!("expected IN, got {:?}", q.filter);
        };
        assert_eq!(
            list,
            [
                Literal::String("a'b".into()),
                Literal::String("c\"d".into()),
                Literal::Number(-4.0),
                Literal::Number(2.5),
                Literal::Number(16.0),
                Literal::Bool(true),
                Literal::Bool(false),
                Literal::Null,
            ]
        );
    }

    #[test]
    fn syntax_errors_name_position_and_expectation() {
        let cases: &[(&str, &[&str])] = &[
            ("", &["character 1", "expected SELECT", "end of the query"]),
            ("SELECT * devices", &["character 10", "expected FROM", "`devices`"]),
            ("SELECT * FROM things", &["character 15", "`devices` after FROM", "`things`"]),
            ("SELECT * FROM devices WHERE", &["character 28", "expected a condition"]),
            ("SELECT * FROM devices WHERE tags.x", &[]),
            (
                "SELECT * FROM devices WHERE tags.x 'US'",
                &["character 36", "comparison operator", "the string 'US'"],
            ),
            ("SELECT * FROM devices WHERE tags.x = ", &["character 38", "after ="]),
            ("SELECT * FROM devices WHERE (a = 1", &["character 35", "`)` to close the `(` at character 29"]),
            ("SELECT * FROM devices WHERE a IN 'x'", &["character 34", "`[` to start the list"]),
            ("SELECT * FROM devices WHERE a IN [b]", &["character 35", "a literal"]),
            ("SELECT * FROM devices WHERE a IN [1 2]", &["character 37", "`,` or `]`"]),
            ("SELECT TOP x * FROM devices", &["character 12", "whole number of results after TOP"]),
            ("SELECT TOP 2.5 * FROM devices", &["whole number of results after TOP", "2.5"]),
            ("SELECT TOP -1 * FROM devices", &["whole number of results after TOP"]),
            ("SELECT * FROM devices WHERE a = 1 b = 2", &["character 35", "AND, OR or the end"]),
            ("SELECT * FROM devices LIMIT 3", &["character 23", "WHERE or the end"]),
            ("SELECT * FROM devices WHERE tags. = 1", &["property name after `.`"]),
            ("SELECT * FROM devices WHERE and = 1", &["character 29", "expected a condition", "`and`"]),
            ("SELECT a AS FROM devices", &["a name after AS"]),
            ("SELECT * FROM devices WHERE a = -'x'", &["a number after `-`"]),
            ("SELECT * FROM devices.foo", &["`modules` or `jobs`", "`foo`"]),
            ("SELECT COUNT(x) FROM devices", &["COUNT takes no argument"]),
        ];
        for (text, needles) in cases {
            let result = Query::parse(text);
            if needles.is_empty() {
                assert!(result.is_ok(), "{text}: {result:?}");
                continue;
            }
            let message = err(text);
            for needle in *needles {
                assert!(message.contains(needle), "{text}: `{message}` lacks `{needle}`");
            }
        }
    }

    #[test]
    fn unsupported_constructs_are_named() {
        let cases = [
            ("SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'x'", "FROM devices.jobs"),
            ("SELECT tags.a AS a, COUNT() AS n FROM devices GROUP BY tags.a", "COUNT() together"),
            ("SELECT * FROM devices GROUP BY tags.a", "GROUP BY"),
            ("SELECT * FROM devices WHERE a = 1 ORDER BY a", "ORDER BY"),
            ("SELECT COUNT() AS n, deviceId FROM devices", "COUNT() together"),
            ("SELECT AVG(tags.floor) AS f FROM devices", "aggregate AVG()"),
            ("SELECT * FROM devices WHERE upper(deviceId) = 'A'", "function UPPER()"),
            ("SELECT * FROM devices WHERE a = lower(b)", "function LOWER()"),
            ("SELECT * FROM devices WHERE a + 1 = 2", "arithmetic operator `+`"),
            ("SELECT * FROM devices WHERE a = 1 * 2", "arithmetic operator `*`"),
            ("SELECT * FROM devices WHERE a = b - 1", "arithmetic operator `-`"),
        ];
        for (text, construct) in cases {
            let error = Query::parse(text).expect_err(text);
            assert!(matches!(error, QueryError::Unsupported { .. }), "{text}: {error:?}");
            assert!(error.to_string().contains(construct), "{text}: {error}");
        }
    }

    #[test]
    fn duplicate_projection_keys_are_refused() {
        let error = Query::parse("SELECT tags.a, properties.reported.a FROM devices").unwrap_err();
        assert_eq!(error, QueryError::DuplicateKey { key: "a".into() });
        assert!(Query::parse("SELECT tags.a, properties.reported.a AS b FROM devices").is_ok());
    }

    #[test]
    fn length_limit_is_enforced_in_characters() {
        let max = crate::limits::QUERY_MAX_CHARS;
        let head = "SELECT * FROM devices WHERE a = '";
        let fill = |n: usize| format!("{head}{}'", "é".repeat(n - head.len() - 1));
        assert!(Query::parse(&fill(max)).is_ok());
        let error = Query::parse(&fill(max + 1)).unwrap_err();
        assert_eq!(error, QueryError::TooLong { length: max + 1, max });
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let deep = format!("SELECT * FROM devices WHERE {}a = 1{}", "(".repeat(4000), ")".repeat(4000));
        assert!(matches!(Query::parse(&deep), Err(QueryError::TooDeep { .. })));
        let nots = format!("SELECT * FROM devices WHERE {}a = 1", "NOT ".repeat(2000));
        assert!(matches!(Query::parse(&nots), Err(QueryError::TooDeep { .. })));
        let fine =
            format!("SELECT * FROM devices WHERE {}deviceId = 'devA'{}", "(".repeat(60), ")".repeat(60));
        assert_eq!(ids(&fine), ["devA"]);
    }

    #[test]
    fn longest_flat_chains_evaluate() {
        // The longest possible AND/OR chains build left-deep trees; evaluating and dropping them
        // must fit in a test thread's stack.
        let max = crate::limits::QUERY_MAX_CHARS;
        for joiner in [" OR a", " AND a"] {
            let head = "SELECT * FROM devices WHERE a";
            let count = (max - head.len()) / joiner.len();
            let text = format!("{head}{}", joiner.repeat(count));
            let query = Query::parse(&text).unwrap();
            assert!(query.run(&twins()).is_empty());
        }
    }

    #[test]
    fn random_garbage_never_panics() {
        const WORDS: &[&str] = &[
            "SELECT",
            "select",
            "TOP",
            "*",
            "FROM",
            "devices",
            ".",
            "modules",
            "WHERE",
            "AND",
            "OR",
            "NOT",
            "IN",
            "NIN",
            "IS_DEFINED",
            "COUNT",
            "AS",
            "(",
            ")",
            "[",
            "]",
            ",",
            "=",
            "!=",
            "<>",
            "<",
            ">=",
            "'a'",
            "'",
            "\"b\"",
            "\\",
            "-",
            "1",
            "2.5",
            "0x",
            "1e",
            "tags",
            "x",
            "$version",
            "true",
            "null",
            "GROUP",
            "BY",
            "+",
            "é",
            ";",
            " ",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x0010_774b);
        let all = twins();
        let mut parsed = 0;
        for _ in 0..5000 {
            let len = rng.random_range(0..24);
            let text: Vec<&str> = (0..len).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
            let sep = if rng.random_bool(0.5) { " " } else { "" };
            if let Ok(query) = Query::parse(&text.join(sep)) {
                parsed += 1;
                let _ = query.run(&all);
            }
        }
        // A few prefixed runs so the parser gets past SELECT ... FROM devices WHERE.
        for _ in 0..3000 {
            let len = rng.random_range(0..12);
            let tail: Vec<&str> = (0..len).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
            let text = format!("SELECT * FROM devices WHERE {}", tail.join(" "));
            if let Ok(query) = Query::parse(&text) {
                parsed += 1;
                let _ = query.run(&all);
            }
        }
        assert!(parsed > 0, "the generator should produce some valid queries");
    }

    #[test]
    fn from_devices_modules_reads_module_twins() {
        let q = Query::parse("SELECT * FROM devices.modules WHERE moduleId = 'm1'").unwrap();
        assert_eq!(q.collection, Collection::Modules);
        assert_eq!(Query::parse("SELECT * FROM devices").unwrap().collection, Collection::Devices);
        assert!(Query::parse("SELECT * FROM devices.modules.x").is_err());
        let q = Query::parse("SELECT * FROM devices.modules WHERE devices.modules.moduleId = 'm1'").unwrap();
        assert!(q.matches(&serde_json::json!({ "moduleId": "m1" })));
    }
}
