//! Evaluation of a parsed `WHERE` condition against one twin, with three-valued logic.
//!
//! IoT Hub's query engine follows the SQL/Cosmos DB model: a comparison that involves a missing
//! property, an object or array, or two values of different kinds is *undefined*, and undefined
//! survives `NOT`. Only conditions that come out [`Truth::True`] select a twin. Evaluation
//! borrows from the twin and the query and allocates nothing.

use std::cmp::Ordering;

use serde_json::Value;

use super::{CmpOp, Expr, Literal, Operand};

/// The result of a condition: SQL-style true, false or undefined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truth {
    True,
    False,
    /// Neither: a missing property or a comparison between values of different kinds.
    Undefined,
}

impl Truth {
    fn from_bool(value: bool) -> Truth {
        if value { Truth::True } else { Truth::False }
    }

    fn and(self, other: Truth) -> Truth {
        match (self, other) {
            (Truth::False, _) | (_, Truth::False) => Truth::False,
            (Truth::True, Truth::True) => Truth::True,
            _ => Truth::Undefined,
        }
    }

    fn or(self, other: Truth) -> Truth {
        match (self, other) {
            (Truth::True, _) | (_, Truth::True) => Truth::True,
            (Truth::False, Truth::False) => Truth::False,
            _ => Truth::Undefined,
        }
    }

    fn not(self) -> Truth {
        match self {
            Truth::True => Truth::False,
            Truth::False => Truth::True,
            Truth::Undefined => Truth::Undefined,
        }
    }
}

/// A primitive value borrowed from the twin or the query.
#[derive(Debug, Clone, Copy)]
enum Prim<'a> {
    Null,
    Bool(bool),
    Num(f64),
    Str(&'a str),
}

impl Expr {
    /// Evaluates this condition against `twin`.
    pub fn eval(&self, twin: &Value) -> Truth {
        match self {
            Expr::Or(a, b) => {
                let left = a.eval(twin);
                if left == Truth::True {
                    return left;
                }
                left.or(b.eval(twin))
            }
            Expr::And(a, b) => {
                let left = a.eval(twin);
                if left == Truth::False {
                    return left;
                }
                left.and(b.eval(twin))
            }
            Expr::Not(inner) => inner.eval(twin).not(),
            Expr::Compare { left, op, right } => match (resolve(left, twin), resolve(right, twin)) {
                // A configuration's status is written `applied` in twins and compared with
                // `'Applied'` in IoT Hub's own metric queries: compare it ignoring case.
                (Some(Prim::Str(l)), Some(Prim::Str(r)))
                    if matches!(op, CmpOp::Eq | CmpOp::Ne)
                        && (is_config_status(left) || is_config_status(right)) =>
                {
                    Truth::from_bool(l.eq_ignore_ascii_case(r) == (*op == CmpOp::Eq))
                }
                (Some(l), Some(r)) => compare(*op, l, r),
                _ => Truth::Undefined,
            },
            Expr::In { operand, list, negated } => {
                let found = contains(operand, list, twin);
                if *negated { found.not() } else { found }
            }
            Expr::IsDefined(path) => Truth::from_bool(path.lookup(twin).is_some()),
            Expr::Value(operand) => match resolve(operand, twin) {
                Some(Prim::Bool(b)) => Truth::from_bool(b),
                _ => Truth::Undefined,
            },
        }
    }
}

/// Whether `operand` is `configurations.{id}.status`.
fn is_config_status(operand: &Operand) -> bool {
    matches!(operand, Operand::Path(p) if matches!(p.segments(), [c, _, s] if c == "configurations" && s == "status"))
}

/// `operand IN list`: undefined unless the operand is a primitive.
fn contains(operand: &Operand, list: &[Literal], twin: &Value) -> Truth {
    let Some(value) = resolve(operand, twin) else {
        return Truth::Undefined;
    };
    let hit = list.iter().any(|item| compare(CmpOp::Eq, value, literal(item)) == Truth::True);
    Truth::from_bool(hit)
}

/// The primitive an operand stands for; `None` when missing, an object or an array.
fn resolve<'a>(operand: &'a Operand, twin: &'a Value) -> Option<Prim<'a>> {
    match operand {
        Operand::Literal(lit) => Some(literal(lit)),
        Operand::Path(path) => match path.lookup(twin)? {
            Value::Null => Some(Prim::Null),
            Value::Bool(b) => Some(Prim::Bool(*b)),
            Value::Number(n) => n.as_f64().map(Prim::Num),
            Value::String(s) => Some(Prim::Str(s)),
            Value::Array(_) | Value::Object(_) => None,
        },
    }
}

fn literal(lit: &Literal) -> Prim<'_> {
    match lit {
        Literal::Null => Prim::Null,
        Literal::Bool(b) => Prim::Bool(*b),
        Literal::Number(n) => Prim::Num(*n),
        Literal::String(s) => Prim::Str(s),
    }
}

/// Compares two primitives of the same kind; different kinds are undefined. `null` only
/// supports `=` and `!=` (against `null`).
fn compare(op: CmpOp, left: Prim<'_>, right: Prim<'_>) -> Truth {
    let ordering = match (left, right) {
        (Prim::Num(a), Prim::Num(b)) => a.partial_cmp(&b),
        (Prim::Str(a), Prim::Str(b)) => Some(a.cmp(b)),
        (Prim::Bool(a), Prim::Bool(b)) => Some(a.cmp(&b)),
        (Prim::Null, Prim::Null) if matches!(op, CmpOp::Eq | CmpOp::Ne) => Some(Ordering::Equal),
        _ => None,
    };
    let Some(ordering) = ordering else {
        return Truth::Undefined;
    };
    Truth::from_bool(match op {
        CmpOp::Eq => ordering == Ordering::Equal,
        CmpOp::Ne => ordering != Ordering::Equal,
        CmpOp::Lt => ordering == Ordering::Less,
        CmpOp::Gt => ordering == Ordering::Greater,
        CmpOp::Le => ordering != Ordering::Greater,
        CmpOp::Ge => ordering != Ordering::Less,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use Truth::{False as F, True as T, Undefined as U};

    #[test]
    fn three_valued_tables() {
        let all = [T, F, U];
        let and = [[T, F, U], [F, F, F], [U, F, U]];
        let or = [[T, T, T], [T, F, U], [T, U, U]];
        for (i, a) in all.iter().enumerate() {
            for (j, b) in all.iter().enumerate() {
                assert_eq!(a.and(*b), and[i][j], "{a:?} AND {b:?}");
                assert_eq!(a.or(*b), or[i][j], "{a:?} OR {b:?}");
            }
        }
        assert_eq!([T.not(), F.not(), U.not()], [F, T, U]);
    }

    #[test]
    fn compare_same_kinds_only() {
        use Prim::*;
        assert_eq!(compare(CmpOp::Lt, Num(1.0), Num(2.0)), T);
        assert_eq!(compare(CmpOp::Eq, Num(2.0), Num(2.0)), T);
        assert_eq!(compare(CmpOp::Ge, Str("b"), Str("a")), T);
        assert_eq!(compare(CmpOp::Lt, Bool(false), Bool(true)), T);
        assert_eq!(compare(CmpOp::Eq, Null, Null), T);
        assert_eq!(compare(CmpOp::Ne, Null, Null), F);
        assert_eq!(compare(CmpOp::Lt, Null, Null), U);
        assert_eq!(compare(CmpOp::Eq, Str("1"), Num(1.0)), U);
        assert_eq!(compare(CmpOp::Ne, Str("1"), Num(1.0)), U);
        assert_eq!(compare(CmpOp::Ne, Null, Num(1.0)), U);
    }

    #[test]
    fn objects_and_arrays_are_not_comparable() {
        let twin = json!({"tags": {"o": {"a": 1}, "arr": [1]}});
        let path = |p: &str| Operand::Path(super::super::Path::new(p.split('.').map(String::from).collect()));
        assert!(resolve(&path("tags.o"), &twin).is_none());
        assert!(resolve(&path("tags.arr"), &twin).is_none());
        assert!(resolve(&path("tags.missing"), &twin).is_none());
        assert!(matches!(
            resolve(&path("tags.o.a"), &twin),
            Some(Prim::Num(n)) if n == 1.0
        ));
    }
}
