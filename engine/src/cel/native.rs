//! The native path of a CEL condition: the common shapes (fields of `args`, `run` and `agent`,
//! comparisons, `in`, `size`, the string tests, `has`, `all`/`exists`/`exists_one` and
//! arithmetic) compiled into a tree evaluated straight over the call's JSON, with no conversion
//! into CEL values, no environment and no allocation.
//!
//! It is a fast path, never a second meaning: it answers only where it is sure to say what the
//! interpreter says, and hands everything else to the interpreter. A condition with anything it
//! does not know (a type name, a conversion, a macro building a list, ...) is never compiled
//! here; at evaluation, any error and any value it does not model (lists compared for equality,
//! strings added, a division, a mixed-type `in`, ...) makes it return `None`, and the caller asks
//! the interpreter, which gives the answer and the error message. CEL is free of side effects,
//! so asking twice changes nothing. `tests::agrees_with_the_interpreter` holds it to that over
//! generated conditions and arguments.

use cel::IdedExpr;
use cel::common::ast::{Expr, LiteralValue, operators};
use serde_json::{Map, Value as Json};

/// How many names comprehensions may bind at once (each binds its variable and its
/// accumulator): conditions nesting deeper go to the interpreter.
const SLOTS: usize = 8;

/// A compiled condition.
#[derive(Debug)]
pub(crate) struct Native {
    root: Node,
}

/// A constant of the condition's source.
#[derive(Debug)]
enum Const {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    Str(String),
    List(Vec<Const>),
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy)]
enum Arith {
    Add,
    Sub,
    Mul,
}

#[derive(Debug, Clone, Copy)]
enum StrTest {
    StartsWith,
    EndsWith,
    Contains,
}

#[derive(Debug)]
enum Node {
    Const(Const),
    /// `args`, `run` or `agent`, by its index in [`super::VARIABLES`].
    Root(usize),
    /// A name a comprehension bound, by slot.
    Local(usize),
    Select(Box<Node>, String),
    Has(Box<Node>, String),
    Index(Box<Node>, Box<Node>),
    Not(Box<Node>),
    Neg(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Cond(Box<Node>, Box<Node>, Box<Node>),
    Eq(Box<Node>, Box<Node>),
    Ne(Box<Node>, Box<Node>),
    Cmp(Cmp, Box<Node>, Box<Node>),
    In(Box<Node>, Box<Node>),
    Arith(Arith, Box<Node>, Box<Node>),
    Size(Box<Node>),
    StrTest(StrTest, Box<Node>, Box<Node>),
    Matches(Box<Node>, regex::Regex),
    NotStrictlyFalse(Box<Node>),
    Loop(Box<Loop>),
}

#[derive(Debug)]
struct Loop {
    range: Node,
    item: usize,
    accu: usize,
    init: Node,
    cond: Node,
    step: Node,
    result: Node,
}

/// A value during evaluation, borrowed from the call's JSON or the condition's constants.
#[derive(Clone, Copy)]
enum Val<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    Str(&'a str),
    Json(&'a [Json]),
    Consts(&'a [Const]),
    Map(&'a Map<String, Json>),
}

impl Native {
    /// The native form of `expression`, or `None` when it uses anything this path does not
    /// model (the interpreter then evaluates it every time).
    pub(crate) fn compile(expression: &IdedExpr) -> Option<Self> {
        let mut scope = Vec::new();
        Some(Self {
            root: compile(expression, &mut scope)?,
        })
    }

    /// The condition's value over `roots` (`args`, `run`, `agent`), or `None` for the
    /// interpreter to decide.
    pub(crate) fn evaluate(&self, roots: [&Json; 3]) -> Option<bool> {
        let mut frame = Frame {
            roots,
            slots: [Val::Null; SLOTS],
        };
        match frame.eval(&self.root)? {
            Val::Bool(b) => Some(b),
            _ => None,
        }
    }
}

fn compile(expression: &IdedExpr, scope: &mut Vec<String>) -> Option<Node> {
    let boxed = |e: &IdedExpr, scope: &mut Vec<String>| compile(e, scope).map(Box::new);
    Some(match &expression.expr {
        Expr::Literal(literal) => Node::Const(constant(literal)?),
        Expr::List(list) if list.optional_indices.is_empty() => {
            let mut items = Vec::with_capacity(list.elements.len());
            for element in &list.elements {
                match compile(element, scope)? {
                    Node::Const(c) => items.push(c),
                    _ => return None,
                }
            }
            Node::Const(Const::List(items))
        }
        Expr::Ident(name) => match scope.iter().rposition(|bound| bound == name) {
            Some(slot) => Node::Local(slot),
            None => Node::Root(super::VARIABLES.iter().position(|v| v == name)?),
        },
        Expr::Select(select) => {
            let operand = boxed(&select.operand, scope)?;
            if select.test {
                Node::Has(operand, select.field.clone())
            } else {
                Node::Select(operand, select.field.clone())
            }
        }
        Expr::Call(call) => {
            let name = call.func_name.as_str();
            match (&call.target, call.args.as_slice()) {
                (None, [a, b, c]) if name == operators::CONDITIONAL => {
                    Node::Cond(boxed(a, scope)?, boxed(b, scope)?, boxed(c, scope)?)
                }
                (None, [a, b]) => {
                    let (a, b) = (boxed(a, scope)?, boxed(b, scope)?);
                    match name {
                        operators::LOGICAL_AND => Node::And(a, b),
                        operators::LOGICAL_OR => Node::Or(a, b),
                        operators::EQUALS => Node::Eq(a, b),
                        operators::NOT_EQUALS => Node::Ne(a, b),
                        operators::LESS => Node::Cmp(Cmp::Lt, a, b),
                        operators::LESS_EQUALS => Node::Cmp(Cmp::Le, a, b),
                        operators::GREATER => Node::Cmp(Cmp::Gt, a, b),
                        operators::GREATER_EQUALS => Node::Cmp(Cmp::Ge, a, b),
                        operators::IN => Node::In(a, b),
                        operators::INDEX => Node::Index(a, b),
                        operators::ADD => Node::Arith(Arith::Add, a, b),
                        operators::SUBSTRACT => Node::Arith(Arith::Sub, a, b),
                        operators::MULTIPLY => Node::Arith(Arith::Mul, a, b),
                        "matches" => matches(a, &b)?,
                        _ => return None,
                    }
                }
                (None, [a]) => {
                    let a = boxed(a, scope)?;
                    match name {
                        operators::LOGICAL_NOT => Node::Not(a),
                        operators::NEGATE => Node::Neg(a),
                        operators::NOT_STRICTLY_FALSE => Node::NotStrictlyFalse(a),
                        "size" => Node::Size(a),
                        _ => return None,
                    }
                }
                (Some(target), args) => {
                    let target = boxed(target, scope)?;
                    match (name, args) {
                        ("size", []) => Node::Size(target),
                        ("startsWith", [arg]) => {
                            Node::StrTest(StrTest::StartsWith, target, boxed(arg, scope)?)
                        }
                        ("endsWith", [arg]) => {
                            Node::StrTest(StrTest::EndsWith, target, boxed(arg, scope)?)
                        }
                        ("contains", [arg]) => {
                            Node::StrTest(StrTest::Contains, target, boxed(arg, scope)?)
                        }
                        ("matches", [arg]) => matches(target, &compile(arg, scope)?)?,
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
        Expr::Comprehension(c) if c.iter_var2.is_none() => {
            // What the loop sees: its accumulator while it starts and tests, then its item too.
            let range = compile(&c.iter_range, scope)?;
            let init = compile(&c.accu_init, scope)?;
            if scope.len() + 2 > SLOTS {
                return None;
            }
            let accu = scope.len();
            scope.push(c.accu_var.clone());
            let cond = compile(&c.loop_cond, scope);
            let item = scope.len();
            scope.push(c.iter_var.clone());
            let step = compile(&c.loop_step, scope);
            scope.pop();
            let result = compile(&c.result, scope);
            scope.pop();
            Node::Loop(Box::new(Loop {
                range,
                item,
                accu,
                init,
                cond: cond?,
                step: step?,
                result: result?,
            }))
        }
        _ => return None,
    })
}

fn constant(literal: &LiteralValue) -> Option<Const> {
    Some(match literal {
        LiteralValue::Null => Const::Null,
        LiteralValue::Boolean(b) => Const::Bool(*b.inner()),
        LiteralValue::Int(i) => Const::Int(*i.inner()),
        LiteralValue::UInt(u) => Const::UInt(*u.inner()),
        LiteralValue::Double(d) => Const::Double(*d.inner()),
        LiteralValue::String(s) => Const::Str(s.inner().to_owned()),
        LiteralValue::Bytes(_) => return None,
    })
}

/// `s.matches(pattern)` with a pattern written in the condition, compiled once by the same
/// regex crate the interpreter uses; a pattern that does not compile is the interpreter's to
/// report.
fn matches(target: Box<Node>, pattern: &Node) -> Option<Node> {
    match pattern {
        Node::Const(Const::Str(source)) => {
            Some(Node::Matches(target, regex::Regex::new(source).ok()?))
        }
        _ => None,
    }
}

struct Frame<'a> {
    roots: [&'a Json; 3],
    slots: [Val<'a>; SLOTS],
}

impl<'a> Frame<'a> {
    fn eval(&mut self, node: &'a Node) -> Option<Val<'a>> {
        Some(match node {
            Node::Const(c) => from_const(c),
            Node::Root(i) => from_json(self.roots[*i]),
            Node::Local(slot) => self.slots[*slot],
            Node::Select(operand, field) => match self.eval(operand)? {
                Val::Map(map) => from_json(map.get(field)?),
                _ => return None,
            },
            Node::Has(operand, field) => match self.eval(operand)? {
                Val::Map(map) => Val::Bool(map.contains_key(field)),
                _ => return None,
            },
            Node::Index(operand, index) => {
                let (operand, index) = (self.eval(operand)?, self.eval(index)?);
                let position = match index {
                    Val::Int(i) => usize::try_from(i).ok(),
                    Val::UInt(u) => usize::try_from(u).ok(),
                    _ => None,
                };
                match (operand, index) {
                    (Val::Json(items), Val::Int(_) | Val::UInt(_)) => {
                        from_json(items.get(position?)?)
                    }
                    (Val::Consts(items), Val::Int(_) | Val::UInt(_)) => {
                        from_const(items.get(position?)?)
                    }
                    (Val::Map(map), Val::Str(key)) => from_json(map.get(key)?),
                    _ => return None,
                }
            }
            Node::Not(a) => match self.eval(a)? {
                Val::Bool(b) => Val::Bool(!b),
                _ => return None,
            },
            Node::Neg(a) => match self.eval(a)? {
                Val::Int(i) => Val::Int(i.checked_neg()?),
                Val::Double(d) => Val::Double(-d),
                _ => return None,
            },
            // `false && x` is false whatever x is; past that, only two bools make an answer
            // here (the interpreter's error rules, such as `error && false`, are its own).
            Node::And(a, b) => match self.eval(a)? {
                Val::Bool(false) => Val::Bool(false),
                Val::Bool(true) => match self.eval(b)? {
                    Val::Bool(b) => Val::Bool(b),
                    _ => return None,
                },
                _ => return None,
            },
            Node::Or(a, b) => match self.eval(a)? {
                Val::Bool(true) => Val::Bool(true),
                Val::Bool(false) => match self.eval(b)? {
                    Val::Bool(b) => Val::Bool(b),
                    _ => return None,
                },
                _ => return None,
            },
            Node::Cond(c, a, b) => match self.eval(c)? {
                Val::Bool(true) => self.eval(a)?,
                Val::Bool(false) => self.eval(b)?,
                _ => return None,
            },
            Node::Eq(a, b) => Val::Bool(equals(self.eval(a)?, self.eval(b)?)?),
            Node::Ne(a, b) => Val::Bool(!equals(self.eval(a)?, self.eval(b)?)?),
            Node::Cmp(op, a, b) => {
                let ordering = compare(self.eval(a)?, self.eval(b)?)?;
                Val::Bool(match op {
                    Cmp::Lt => ordering.is_lt(),
                    Cmp::Le => ordering.is_le(),
                    Cmp::Gt => ordering.is_gt(),
                    Cmp::Ge => ordering.is_ge(),
                })
            }
            Node::In(a, b) => {
                let (needle, haystack) = (self.eval(a)?, self.eval(b)?);
                Val::Bool(match haystack {
                    Val::Json(items) => contains(needle, items.iter().map(from_json))?,
                    Val::Consts(items) => contains(needle, items.iter().map(from_const))?,
                    Val::Map(map) => match needle {
                        Val::Str(key) => map.contains_key(key),
                        _ => return None,
                    },
                    _ => return None,
                })
            }
            Node::Arith(op, a, b) => arith(*op, self.eval(a)?, self.eval(b)?)?,
            Node::Size(a) => Val::Int(match self.eval(a)? {
                Val::Str(s) => s.chars().count(),
                Val::Json(items) => items.len(),
                Val::Consts(items) => items.len(),
                Val::Map(map) => map.len(),
                _ => return None,
            } as i64),
            Node::StrTest(test, a, b) => match (self.eval(a)?, self.eval(b)?) {
                (Val::Str(s), Val::Str(t)) => Val::Bool(match test {
                    StrTest::StartsWith => s.starts_with(t),
                    StrTest::EndsWith => s.ends_with(t),
                    StrTest::Contains => s.contains(t),
                }),
                _ => return None,
            },
            Node::Matches(a, regex) => match self.eval(a)? {
                Val::Str(s) => Val::Bool(regex.is_match(s)),
                _ => return None,
            },
            Node::NotStrictlyFalse(a) => match self.eval(a)? {
                Val::Bool(b) => Val::Bool(b),
                _ => return None,
            },
            Node::Loop(l) => self.run_loop(l)?,
        })
    }

    /// A comprehension, as the interpreter runs one: the accumulator starts at `init`; for
    /// each item, stop once `cond` is false, else bind the item and take `step` as the new
    /// accumulator; then `result`. A map yields its keys. Any error hands the whole condition to
    /// the interpreter, whose rules for errors inside `all` and `exists` are its own.
    fn run_loop(&mut self, l: &'a Loop) -> Option<Val<'a>> {
        let init = self.eval(&l.init)?;
        let range = self.eval(&l.range)?;
        self.slots[l.accu] = init;
        match range {
            Val::Json(items) => self.iterate(l, items.iter().map(from_json))?,
            Val::Consts(items) => self.iterate(l, items.iter().map(from_const))?,
            Val::Map(map) => self.iterate(l, map.keys().map(|k| Val::Str(k)))?,
            _ => return None,
        }
        self.eval(&l.result)
    }

    fn iterate(&mut self, l: &'a Loop, items: impl Iterator<Item = Val<'a>>) -> Option<()> {
        for item in items {
            match self.eval(&l.cond)? {
                Val::Bool(true) => {}
                Val::Bool(false) => break,
                _ => return None,
            }
            self.slots[l.item] = item;
            self.slots[l.accu] = self.eval(&l.step)?;
        }
        Some(())
    }
}

fn from_json(value: &Json) -> Val<'_> {
    match value {
        Json::Null => Val::Null,
        Json::Bool(b) => Val::Bool(*b),
        // As serde_json hands numbers to CEL: non-negative integers as uint, negative ones as
        // int, the rest as double.
        Json::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => Val::UInt(u),
            (None, Some(i), _) => Val::Int(i),
            (None, None, Some(d)) => Val::Double(d),
            (None, None, None) => Val::Null,
        },
        Json::String(s) => Val::Str(s),
        Json::Array(items) => Val::Json(items),
        Json::Object(map) => Val::Map(map),
    }
}

fn from_const(c: &Const) -> Val<'_> {
    match c {
        Const::Null => Val::Null,
        Const::Bool(b) => Val::Bool(*b),
        Const::Int(i) => Val::Int(*i),
        Const::UInt(u) => Val::UInt(*u),
        Const::Double(d) => Val::Double(*d),
        Const::Str(s) => Val::Str(s),
        Const::List(items) => Val::Consts(items),
    }
}

/// CEL's ordering of two numbers or two strings, as the interpreter computes it (an int and a
/// double meet as doubles); `None` for anything else and for NaN, which the interpreter
/// reports as an error.
fn compare(a: Val<'_>, b: Val<'_>) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Val::Int(a), Val::Int(b)) => Some(a.cmp(&b)),
        (Val::UInt(a), Val::UInt(b)) => Some(a.cmp(&b)),
        (Val::Int(a), Val::UInt(b)) => Some(match u64::try_from(a) {
            Ok(a) => a.cmp(&b),
            Err(_) => std::cmp::Ordering::Less,
        }),
        (Val::UInt(a), Val::Int(b)) => Some(match i64::try_from(a) {
            Ok(a) => a.cmp(&b),
            Err(_) => std::cmp::Ordering::Greater,
        }),
        (Val::Double(a), Val::Double(b)) => a.partial_cmp(&b),
        (Val::Int(a), Val::Double(b)) => (a as f64).partial_cmp(&b),
        (Val::UInt(a), Val::Double(b)) => (a as f64).partial_cmp(&b),
        (Val::Double(a), Val::Int(b)) => a.partial_cmp(&(b as f64)),
        (Val::Double(a), Val::UInt(b)) => a.partial_cmp(&(b as f64)),
        (Val::Str(a), Val::Str(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

fn is_number(v: Val<'_>) -> bool {
    matches!(v, Val::Int(_) | Val::UInt(_) | Val::Double(_))
}

/// CEL's `==` between two scalars: numbers of any kind by value (NaN equals nothing), strings,
/// bools and nulls by kind and value, different kinds never equal. `None` when a list or map
/// takes part (the interpreter's to compare).
fn equals(a: Val<'_>, b: Val<'_>) -> Option<bool> {
    Some(match (a, b) {
        (Val::Json(_) | Val::Consts(_) | Val::Map(_), _)
        | (_, Val::Json(_) | Val::Consts(_) | Val::Map(_)) => return None,
        (a, b) if is_number(a) && is_number(b) => compare(a, b) == Some(std::cmp::Ordering::Equal),
        (Val::Str(a), Val::Str(b)) => a == b,
        (Val::Bool(a), Val::Bool(b)) => a == b,
        (Val::Null, Val::Null) => true,
        _ => false,
    })
}

/// `needle in list`: whether an item equals it; `None` when a list or map takes part.
fn contains<'a>(needle: Val<'a>, items: impl Iterator<Item = Val<'a>>) -> Option<bool> {
    for item in items {
        if equals(item, needle)? {
            return Some(true);
        }
    }
    Some(false)
}

/// `+`, `-` and `*` of two numbers of one kind, where the interpreter gives a number: an int
/// or uint that overflows is its error to report.
fn arith<'a>(op: Arith, a: Val<'a>, b: Val<'a>) -> Option<Val<'a>> {
    Some(match (a, b) {
        (Val::Int(a), Val::Int(b)) => Val::Int(match op {
            Arith::Add => a.checked_add(b)?,
            Arith::Sub => a.checked_sub(b)?,
            Arith::Mul => a.checked_mul(b)?,
        }),
        (Val::UInt(a), Val::UInt(b)) => Val::UInt(match op {
            Arith::Add => a.checked_add(b)?,
            Arith::Sub => a.checked_sub(b)?,
            Arith::Mul => a.checked_mul(b)?,
        }),
        (Val::Double(a), Val::Double(b)) => Val::Double(match op {
            Arith::Add => a + b,
            Arith::Sub => a - b,
            Arith::Mul => a * b,
        }),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::super::Condition;

    fn roots() -> (Json, Json) {
        (
            json!({"id": "run-1", "step": 3, "tokens": 1200, "cost": "0.42",
                "calls": {"update_order_status": 2}, "items": {}}),
            json!({"name": "support-agent-v2", "namespace": "support",
                "username": "system:serviceaccount:support:agent-support-agent-v2"}),
        )
    }

    use super::Json;

    /// Conditions as policies write them: each has a native form, and over ordinary arguments
    /// the native path answers (it does not hand over) what the interpreter answers.
    #[test]
    fn common_conditions_are_answered_natively_as_the_interpreter_answers() {
        let args = json!({"order_ids": ["O-1", "O-22"], "status": "refunded", "amount": 40,
            "refund": 12.5, "delta": -3, "email": "ada@example.com", "note": "café ☕",
            "meta": {"source": "web", "tags": ["a"]}, "flag": true, "none": null});
        let (run, agent) = roots();
        let cases = [
            ("args.order_ids.all(id, id.startsWith('O-'))", true),
            ("args.order_ids.exists(id, id.endsWith('22'))", true),
            ("args.order_ids.exists_one(id, id == 'O-1')", true),
            (
                "size(args.order_ids) <= 10 && args.order_ids.size() > 1",
                true,
            ),
            (
                "args.status in ['cancelled', 'refunded', 'processing']",
                true,
            ),
            ("!(args.status in ['deleted'])", true),
            ("args.amount <= 100 && args.amount > 39", true),
            (
                "args.amount == 40 && args.amount == 40.0 && args.amount != 41u",
                true,
            ),
            ("args.refund < 20 && args.refund * 2.0 == 25.0", true),
            (
                "args.delta < 0 && -args.delta == 3 && args.delta + 1 == -2",
                true,
            ),
            ("args.amount - 1u == 39u", true),
            ("args.email.matches('^[a-z]+@example\\\\.com$')", true),
            (
                "args.email.contains('@') && !args.email.endsWith('.org')",
                true,
            ),
            ("size(args.note) == 6", true),
            (
                "has(args.meta) && args.meta.source == 'web' && 'source' in args.meta",
                true,
            ),
            ("has(args.missing)", false),
            (
                "args.meta['tags'][0] == 'a' && args.order_ids[1] == 'O-22'",
                true,
            ),
            ("args.flag ? args.amount > 10 : false", true),
            ("args.none == null && args.status != null", true),
            ("args.meta.exists(k, k == 'tags')", true),
            ("[1, 2, 3].all(n, n > 0) && 2 in [1, 2u, 3.0]", true),
            ("run.step < 10 && run.calls.update_order_status < 3", true),
            (
                "agent.namespace == 'support' && agent.name.startsWith('support-')",
                true,
            ),
            ("args.status == 'refunded' || args.missing", true),
            ("args.status == 'pending' && args.missing", false),
        ];
        for (source, expected) in cases {
            let condition = Condition::compile(source).unwrap();
            assert!(condition.is_native(), "{source}: no native form");
            let native = condition
                .native
                .as_ref()
                .unwrap()
                .evaluate([&args, &run, &agent]);
            assert_eq!(native, Some(expected), "{source}: native");
            assert_eq!(
                condition.interpret(&args, &run, &agent),
                Ok(expected),
                "{source}: interpreter"
            );
        }
    }

    /// What the native path does not model goes to the interpreter, whole or per call.
    #[test]
    fn the_interpreter_answers_what_the_native_path_does_not_model() {
        let (run, agent) = roots();
        // No native form: type names, conversions, list-building macros, bytes.
        for source in [
            "type(args.x) == string",
            "int(args.x) > 1",
            "size(args.ids.filter(i, i.startsWith('O-'))) > 0",
            "args.ids.map(i, i + '!').all(i, i.endsWith('!'))",
            "b'abc' == b'abc'",
            "args.x.matches(args.pattern)",
        ] {
            let condition = Condition::compile(source).unwrap();
            assert!(!condition.is_native(), "{source}: compiled natively");
        }
        // A native form that hands over: errors, lists compared, overflow, mixed arithmetic.
        for (source, args) in [
            ("args.missing == 1", json!({})),
            ("args.a == args.b", json!({"a": [1], "b": [1]})),
            ("args.n + 1 > 0", json!({"n": 5})),
            ("args.n * 2 > 0", json!({"n": -4611686018427387905i64})),
            ("args.x.startsWith('a')", json!({"x": 1})),
            (
                "args.ids.all(i, i.startsWith('O-'))",
                json!({"ids": ["O-1", 2]}),
            ),
        ] {
            let condition = Condition::compile(source).unwrap();
            assert!(condition.is_native(), "{source}: no native form");
            assert_eq!(
                condition
                    .native
                    .as_ref()
                    .unwrap()
                    .evaluate([&args, &run, &agent]),
                None,
                "{source} over {args}: answered natively"
            );
            // The condition's answer is the interpreter's, errors worded by it.
            assert_eq!(
                condition.evaluate(&args, &run, &agent),
                condition.interpret(&args, &run, &agent),
                "{source}"
            );
        }
        // Errors inside all(): the interpreter's rule (a false anywhere wins) still holds.
        let condition = Condition::compile("args.ids.all(i, i.startsWith('O-'))").unwrap();
        assert_eq!(
            condition.evaluate(&json!({"ids": [2, "X-1"]}), &run, &agent),
            Ok(false)
        );
        assert!(
            condition
                .evaluate(&json!({"ids": [2, "O-1"]}), &run, &agent)
                .is_err()
        );
    }

    fn json_value() -> impl Strategy<Value = Json> {
        scalar().prop_recursive(2, 12, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("a".to_owned()),
                        Just("web".to_owned()),
                        Just("O-1".to_owned())
                    ],
                    inner,
                    0..3
                )
                .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    fn scalar() -> impl Strategy<Value = Json> {
        prop_oneof![
            Just(json!(null)),
            any::<bool>().prop_map(Json::from),
            prop_oneof![
                Just(0i64),
                Just(1),
                Just(2),
                Just(40),
                Just(-3),
                Just(i64::MIN),
                Just(i64::MAX)
            ]
            .prop_map(Json::from),
            prop_oneof![
                Just(u64::MAX),
                Just(1u64 << 63),
                Just(9_007_199_254_740_993)
            ]
            .prop_map(Json::from),
            prop_oneof![
                Just(2.5f64),
                Just(-0.0),
                Just(40.0),
                Just(1e300),
                Just(9_007_199_254_740_992.0)
            ]
            .prop_map(Json::from),
            prop_oneof![
                Just("O-1"),
                Just("O-22"),
                Just(""),
                Just("café ☕"),
                Just("a"),
                Just("web"),
                Just("refunded")
            ]
            .prop_map(Json::from),
        ]
    }

    /// A scalar as the CEL literals that write it: a non-negative integer both as an int and
    /// as a uint (the JSON gives CEL a uint), a double, a string, a bool or null.
    fn literals(value: &Json) -> Vec<String> {
        match value {
            Json::Null => vec!["null".to_owned()],
            Json::Bool(b) => vec![b.to_string()],
            Json::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), Some(i), _) => vec![format!("{u}u"), i.to_string()],
                (Some(u), None, _) => vec![format!("{u}u")],
                // i64::MIN has no literal: CEL reads it as the negation of a too-large int.
                (None, Some(i), _) if i != i64::MIN => vec![i.to_string()],
                (None, None, Some(d)) => vec![format!("{d:?}")],
                _ => vec![],
            },
            Json::String(s) => vec![format!("{s:?}")],
            _ => vec![],
        }
    }

    /// Expressions of every shape the native path compiles, and a few it does not.
    fn expression() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("args.a".to_owned()),
            Just("args.b".to_owned()),
            Just("args.c".to_owned()),
            Just("args.missing".to_owned()),
            Just("run.step".to_owned()),
            Just("agent.name".to_owned()),
            Just("x".to_owned()),
            Just("1".to_owned()),
            Just("-3".to_owned()),
            Just("40u".to_owned()),
            Just("2.5".to_owned()),
            Just("'O-1'".to_owned()),
            Just("'a'".to_owned()),
            Just("true".to_owned()),
            Just("null".to_owned()),
            Just("[1, 'a', 2.5]".to_owned()),
            Just("['O-1', 'web']".to_owned()),
            Just("[]".to_owned()),
        ];
        leaf.prop_recursive(4, 40, 3, |inner| {
            let two = (inner.clone(), inner.clone());
            prop_oneof![
                (
                    inner.clone(),
                    prop_oneof![
                        Just("=="),
                        Just("!="),
                        Just("<"),
                        Just("<="),
                        Just(">"),
                        Just(">="),
                        Just("&&"),
                        Just("||"),
                        Just("+"),
                        Just("-"),
                        Just("*"),
                        Just("in")
                    ],
                    inner.clone()
                )
                    .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
                inner.clone().prop_map(|a| format!("!({a})")),
                inner.clone().prop_map(|a| format!("-({a})")),
                inner.clone().prop_map(|a| format!("size({a})")),
                two.clone()
                    .prop_map(|(a, b)| format!("({a}).startsWith({b})")),
                two.clone()
                    .prop_map(|(a, b)| format!("({a}).contains({b})")),
                inner
                    .clone()
                    .prop_map(|a| format!("({a}).matches('^O-[0-9]+$')")),
                two.clone().prop_map(|(a, b)| format!("({a})[{b}]")),
                (inner.clone(), inner.clone(), inner.clone())
                    .prop_map(|(c, a, b)| format!("(({c}) ? ({a}) : ({b}))")),
                (
                    inner.clone(),
                    prop_oneof![Just("all"), Just("exists"), Just("exists_one")],
                    inner
                )
                    .prop_map(|(range, m, body)| format!("({range}).{m}(x, {body})")),
                Just("has(args.a)".to_owned()),
                Just("has(args.c.a)".to_owned()),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Every operator over every pair of scalar kinds (numbers at their edges, strings,
        /// bools, null), from the arguments and from the source: where the native path answers,
        /// the interpreter agrees.
        #[test]
        fn operators_agree_with_the_interpreter(
            a in scalar(),
            b in scalar(),
            op in prop::sample::select(vec!["==", "!=", "<", "<=", ">", ">=", "+", "-", "*"]),
            test in prop::sample::select(vec!["{l} == {l}", "{l} < {r}", "{l} > {r}", "{l} >= {r}", "{l} != {r}"]),
        ) {
            let args = json!({"a": a, "b": b});
            let (run, agent) = roots();
            let mut operands = vec!["args.b".to_owned()];
            operands.extend(literals(&b));
            let mut sources = vec![
                "args.a in ['O-1', 1, 2.5, null, true]".to_owned(),
                format!("args.a in [{}]", operands.join(", ")),
            ];
            for b in &operands {
                if ["+", "-", "*"].contains(&op) {
                    // The arithmetic's result, compared with itself and with an argument.
                    sources.push(format!("args.a {op} {b} == args.a {op} {b}"));
                    sources.push(test.replace("{l}", &format!("(args.a {op} {b})")).replace("{r}", "args.a"));
                } else {
                    sources.push(format!("args.a {op} {b}"));
                    sources.push(format!("{b} {op} args.a"));
                }
            }
            for source in sources {
                let condition = Condition::compile(&source).unwrap();
                if let Some(native) = condition.native.as_ref().and_then(|n| n.evaluate([&args, &run, &agent])) {
                    prop_assert_eq!(
                        condition.interpret(&args, &run, &agent),
                        Ok(native),
                        "{} over {}", source, args
                    );
                }
            }
        }

        /// Wherever the native path answers, the interpreter gives the same bool.
        #[test]
        fn agrees_with_the_interpreter(
            source in expression(),
            a in json_value(),
            b in json_value(),
            c in json_value(),
        ) {
            let Ok(condition) = Condition::compile(&source) else { return Ok(()) };
            let args = json!({"a": a, "b": b, "c": c});
            let (run, agent) = roots();
            if let Some(native) = condition.native.as_ref().and_then(|n| n.evaluate([&args, &run, &agent])) {
                prop_assert_eq!(
                    condition.interpret(&args, &run, &agent),
                    Ok(native),
                    "{} over {}", source, args
                );
            }
        }
    }
}
