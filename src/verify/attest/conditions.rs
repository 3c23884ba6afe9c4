//! CEL conditions over an attestation: compiled and checked when a policy loads, evaluated
//! against one statement, and explained when they fail.
//!
//! The language is cel-rust's (the `cel` crate), the CEL that Kubernetes uses in
//! ValidatingAdmissionPolicy. Conditions see four variables: `predicate` (the predicate JSON),
//! `statement` (`_type`, `subject` and `predicateType`), `image` (`registry`, `repository`,
//! `digest`) and `now` (a timestamp the caller passes: evaluation reads no clock).
//!
//! cel-rust 0.15 parses and evaluates but has no type checker and no cost limit, so what cel-go
//! checks at compile time is checked here, on the parsed tree, when the policy loads:
//! - every variable is one of the four, or the variable of an enclosing macro (`all`, `exists`,
//!   `exists_one`, `map`, `filter`); every function is one of the standard library's;
//! - the result can be a bool (a literal of another type, arithmetic, `size`, a list... is
//!   refused; a field of the predicate, whose type only the data knows, is checked when it runs);
//! - `matches` takes a literal pattern, compiled once here (cel-rust would compile it again at
//!   every call: inside a macro, once per element).
//!
//! The cost of an evaluation is bounded by the expression and the input, not by a meter, since
//! cel-rust has none. The input is the statement, at most [`super::MAX_ATTESTATION_BYTES`]. The
//! expression is at most [`MAX_EXPRESSION_BYTES`], nested at most [`MAX_PARSE_DEPTH`] deep, with
//! macros nested at most [`MAX_MACRO_NESTING`] deep. What could make the work grow faster than
//! the input is refused in a macro's body, which runs once per element:
//! - a variable other than the macro's own (and `now`, `image`, which are small): `predicate`
//!   there would be read, compared or copied again for every element, making the work the square
//!   of the input;
//! - a macro over anything but a part of the enclosing macro's element, for the same reason;
//! - `+` unless one side is a literal, and list or map literals with anything but literals in
//!   them: `map` would bind each result to the next macro's variable, and chained doublings grow
//!   exponentially.
//!
//! So each macro visits a part of the input at most once per element of its range, and every
//! step works on one element: an evaluation takes time and memory in proportion to the input
//! times the expression's size. Of the predicate, only the parts the conditions read are
//! converted into CEL values ([`hold`], `reads`); a failure is judged again on the whole, so
//! that what it shows does not depend on it. `cargo bench --bench review` measures conditions
//! on a realistic scan and the worst expression these rules admit on a predicate of the largest
//! size, both ways.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::SystemTime;

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue, operators};
use cel::common::types::{CelBool, CelString};
use cel::common::value::CowVal;
use cel::{Context, Env, ExecutionError, Value};

use super::reads::Reads;

/// Longest expression accepted.
pub const MAX_EXPRESSION_BYTES: usize = 1024;
/// Deepest nesting of the parse (cel-rust's default is 96).
pub const MAX_PARSE_DEPTH: u16 = 32;
/// Macros (`all`, `exists`, `map`, ...) inside macros, at most.
pub const MAX_MACRO_NESTING: usize = 3;
/// Compiled size of one `matches` pattern.
const MAX_REGEX_BYTES: usize = 1 << 20;
/// Patterns kept compiled; past this a pattern is compiled at each call (still bounded).
const MAX_CACHED_PATTERNS: usize = 4096;
/// Deepest tree of operations: what evaluation (which recurses) may meet.
pub const MAX_TREE_DEPTH: usize = 64;
/// Stack for parsing and evaluating: cel-rust's parser recurses deeply (about 128 KiB per
/// parenthesis in a debug build, measured), more than a tokio worker's 2 MiB.
const STACK_BYTES: usize = 16 << 20;
/// Longest rendering of a value in an explanation.
const MAX_SHOWN: usize = 160;

/// The variables a condition may name.
pub const VARIABLES: [&str; 4] = ["predicate", "statement", "image", "now"];
/// Type names an expression may use (`type(x) == string`).
const TYPE_NAMES: [&str; 10] = [
    "bool",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
];

/// One compiled condition.
#[derive(Debug)]
pub struct Condition {
    /// The expression as written.
    pub expression: String,
    /// What the policy says when it fails.
    pub message: String,
    expr: IdedExpr,
    /// The parts of the predicate it reads.
    reads: Reads,
}

/// Why a condition did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// It evaluated to false; `saw` is what decided it, where that can be said.
    False {
        message: String,
        saw: Option<String>,
    },
    /// It could not be evaluated (a field absent, a type mismatch): never a pass.
    Error { message: String, error: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::False { message, saw } => {
                write!(f, "condition failed: {message}")?;
                if let Some(saw) = saw {
                    write!(f, " (saw {saw})")?;
                }
                Ok(())
            }
            Failure::Error { message, error } => {
                write!(f, "condition {message:?} could not be evaluated: {error}")
            }
        }
    }
}

/// What a condition is evaluated against.
pub struct Input {
    pub predicate: Value,
    pub statement: Value,
    pub image: Value,
    pub now: Value,
}

impl Input {
    /// The variables for `statement` (the in-toto statement as JSON) of the image
    /// `registry/repository@digest`, at `now`.
    pub fn new(
        mut statement: serde_json::Value,
        image: (&str, &str, &str),
        now: SystemTime,
    ) -> Result<Self, String> {
        let predicate = statement
            .as_object_mut()
            .and_then(|s| s.remove("predicate"))
            .unwrap_or(serde_json::Value::Null);
        Self::with(&predicate, &statement, image, now)
    }

    /// As [`Input::new`], with only the parts of the predicate in `reads`.
    fn reading(
        statement: &serde_json::Value,
        reads: &Reads,
        image: (&str, &str, &str),
        now: SystemTime,
    ) -> Result<Self, String> {
        let null = serde_json::Value::Null;
        let predicate = reads.prune(statement.get("predicate").unwrap_or(&null));
        let rest = match statement {
            serde_json::Value::Object(fields) => serde_json::Value::Object(
                fields
                    .iter()
                    .filter(|(name, _)| *name != "predicate")
                    .map(|(name, v)| (name.clone(), v.clone()))
                    .collect(),
            ),
            other => other.clone(),
        };
        Self::with(&predicate, &rest, image, now)
    }

    fn with(
        predicate: &serde_json::Value,
        statement: &serde_json::Value,
        (registry, repository, digest): (&str, &str, &str),
        now: SystemTime,
    ) -> Result<Self, String> {
        let convert = |v: &serde_json::Value| {
            cel::to_value(v).map_err(|e| format!("the statement cannot be read as CEL: {e}"))
        };
        let image = serde_json::json!({
            "registry": registry,
            "repository": repository,
            "digest": digest,
        });
        let since = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| "the clock is before 1970".to_owned())?;
        let now = i64::try_from(since.as_secs())
            .ok()
            .and_then(|secs| chrono::DateTime::from_timestamp(secs, since.subsec_nanos()))
            .ok_or("the clock is out of range")?;
        Ok(Self {
            predicate: convert(predicate)?,
            statement: convert(statement)?,
            image: convert(&image)?,
            now: Value::Timestamp(now.fixed_offset()),
        })
    }
}

/// Holds every one of `conditions` to `statement` (the in-toto statement as JSON) of the image
/// `registry/repository@digest` at `now`: the first failure, if any. Only the parts of the
/// predicate the conditions read are converted; when one fails, all are judged again on the
/// whole statement, so that the failure, and the values it shows (an explanation may show a
/// whole element), are the same as if the whole had been read from the start.
pub fn hold(
    conditions: &[Condition],
    statement: serde_json::Value,
    image: (&str, &str, &str),
    now: SystemTime,
) -> Result<(), Failure> {
    let mut reads = Reads::default();
    for c in conditions {
        reads.merge(&c.reads);
    }
    let unreadable = |error| Failure::Error {
        message: "the statement".to_owned(),
        error,
    };
    if !reads.is_whole() {
        let input = Input::reading(&statement, &reads, image, now).map_err(unreadable)?;
        if conditions.iter().all(|c| c.holds(&input)) {
            return Ok(());
        }
    }
    let input = Input::new(statement, image, now).map_err(unreadable)?;
    conditions.iter().try_for_each(|c| c.evaluate(&input))
}

/// The environment every condition runs in: the standard library without optional syntax,
/// with fixity's `matches`.
fn env() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Env::stdlib().with_optional_support(false);
        let string = || cel::common::types::STRING_TYPE;
        // New names in an environment without cel's regex feature: neither can collide.
        let _ = env.add_overload(
            "matches",
            "fixity_matches",
            vec![string(), string()],
            matches,
        );
        let _ = env.add_member_overload(
            "matches",
            "fixity_string_matches",
            string(),
            vec![string()],
            matches,
        );
        Arc::new(env)
    })
}

fn patterns() -> &'static Mutex<HashMap<String, regex::Regex>> {
    static PATTERNS: OnceLock<Mutex<HashMap<String, regex::Regex>>> = OnceLock::new();
    PATTERNS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn compile_pattern(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(pattern)
        .size_limit(MAX_REGEX_BYTES)
        .build()
}

/// Compiles `pattern` once and keeps it for the `matches` calls that use it.
fn remember_pattern(pattern: &str) -> Result<(), String> {
    let mut cache = patterns().lock().unwrap_or_else(PoisonError::into_inner);
    if cache.contains_key(pattern) {
        return Ok(());
    }
    let regex = compile_pattern(pattern).map_err(|e| format!("matches: {e}"))?;
    if cache.len() < MAX_CACHED_PATTERNS {
        cache.insert(pattern.to_owned(), regex);
    }
    Ok(())
}

/// `s.matches(pattern)` with the pattern compiled when the policy loaded.
fn matches<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let text = |i: usize| {
        args.get(i)
            .and_then(|a| a.downcast_ref::<CelString<'_>>())
            .map(|s| s.inner().to_owned())
            .ok_or_else(|| ExecutionError::function_error("matches", "takes two strings"))
    };
    let (text, pattern) = (text(0)?, text(1)?);
    let cached = patterns()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&pattern)
        .map(|re| re.is_match(&text));
    let found = match cached {
        Some(found) => found,
        None => compile_pattern(&pattern)
            .map_err(|e| ExecutionError::function_error("matches", e))?
            .is_match(&text),
    };
    Ok(CowVal::owned(CelBool::from(found)))
}

impl Condition {
    /// Parses and checks `expression`; `message` defaults to the expression.
    pub fn compile(expression: &str, message: Option<&str>) -> Result<Self, String> {
        on_large_stack(|| Self::compile_here(expression, message))?
    }

    fn compile_here(expression: &str, message: Option<&str>) -> Result<Self, String> {
        if expression.len() > MAX_EXPRESSION_BYTES {
            return Err(format!(
                "the expression is {} bytes, more than the {MAX_EXPRESSION_BYTES} allowed",
                expression.len()
            ));
        }
        let expr = env()
            .parser()
            .max_recursion_depth(MAX_PARSE_DEPTH)
            .parse(expression)
            .map_err(|e| syntax_error(&e))?;
        if depth(&expr) > MAX_TREE_DEPTH {
            return Err(format!(
                "the expression nests deeper than {MAX_TREE_DEPTH} operations"
            ));
        }
        let kind = Checker.check(&expr, &Scope::default())?;
        if !matches!(kind, Kind::Bool | Kind::Dyn) {
            return Err(format!(
                "the expression returns {}, not a bool",
                kind.name()
            ));
        }
        Ok(Self {
            expression: expression.to_owned(),
            message: message
                .filter(|m| !m.trim().is_empty())
                .unwrap_or(expression)
                .to_owned(),
            reads: Reads::of(&expr),
            expr,
        })
    }

    /// Whether the condition evaluates to `true`, without saying why not.
    fn holds(&self, input: &Input) -> bool {
        Value::resolve(&self.expr, &context(input)) == Ok(Value::Bool(true))
    }

    /// Evaluates the condition; a result other than `true` is a failure.
    pub fn evaluate(&self, input: &Input) -> Result<(), Failure> {
        let ctx = context(input);
        match Value::resolve(&self.expr, &ctx) {
            Ok(Value::Bool(true)) => Ok(()),
            Ok(Value::Bool(false)) => Err(Failure::False {
                message: self.message.clone(),
                saw: self.explain(&self.expr, &ctx),
            }),
            Ok(other) => Err(Failure::Error {
                message: self.message.clone(),
                error: format!("it returned {}, not a bool", show(&other)),
            }),
            Err(e) => Err(Failure::Error {
                message: self.message.clone(),
                error: e.to_string(),
            }),
        }
    }

    /// What made `expr` false in `ctx`: the operands of the comparison that failed, the
    /// element of an `all` that did not satisfy it.
    fn explain(&self, expr: &IdedExpr, ctx: &Context<'_, '_>) -> Option<String> {
        let shown = |e: &IdedExpr| -> Option<String> {
            if matches!(e.expr, Expr::Literal(_)) {
                return None;
            }
            let value = Value::resolve(e, ctx).ok()?;
            Some(format!("{} = {}", written(e)?, show(&value)))
        };
        match &expr.expr {
            Expr::Call(call) => match (call.func_name.as_str(), call.args.as_slice()) {
                (operators::LOGICAL_AND, [a, b]) => {
                    let first_false = [a, b]
                        .into_iter()
                        .find(|e| Value::resolve(e, ctx) == Ok(Value::Bool(false)))?;
                    self.explain(first_false, ctx)
                }
                (operators::LOGICAL_NOT, [a]) => shown(a),
                (
                    operators::EQUALS
                    | operators::NOT_EQUALS
                    | operators::LESS
                    | operators::LESS_EQUALS
                    | operators::GREATER
                    | operators::GREATER_EQUALS
                    | operators::IN,
                    [a, b],
                ) => {
                    let both: Vec<String> = [a, b].into_iter().filter_map(shown).collect();
                    (!both.is_empty()).then(|| both.join(", "))
                }
                ("startsWith" | "endsWith" | "contains" | "matches", _) => {
                    call.target.as_deref().or(call.args.first()).and_then(shown)
                }
                _ => None,
            },
            Expr::Select(select) if select.test => {
                written(&select.operand).map(|t| format!("{t} has no field {:?}", select.field))
            }
            Expr::Comprehension(c) => self.explain_all(c, ctx),
            _ => None,
        }
    }

    /// For an `all`, the first element that failed its body, and why.
    fn explain_all(
        &self,
        c: &cel::common::ast::ComprehensionExpr,
        ctx: &Context<'_, '_>,
    ) -> Option<String> {
        // `all` folds `@result && body`.
        let Expr::Call(step) = &c.loop_step.expr else {
            return None;
        };
        let body = match (step.func_name.as_str(), step.args.as_slice()) {
            (operators::LOGICAL_AND, [_, body]) => body,
            _ => return None,
        };
        let items = match Value::resolve(&c.iter_range, ctx).ok()? {
            Value::List(items) => items,
            _ => return None,
        };
        for item in items.iter() {
            let mut inner = ctx.new_inner_scope();
            inner.add_variable_from_value(c.iter_var.clone(), item.clone());
            if Value::resolve(body, &inner) == Ok(Value::Bool(false)) {
                let mut out = format!("{} = {}", c.iter_var, show(item));
                if let Some(why) = self.explain(body, &inner) {
                    let _ = write!(out, ": {why}");
                }
                return Some(out);
            }
        }
        None
    }
}

/// An operand as it would be written, for the paths and calls explanations name
/// (`predicate.builder.id`, `timestamp(predicate.finished)`); None for anything else.
fn written(e: &IdedExpr) -> Option<String> {
    match &e.expr {
        Expr::Ident(name) => Some(name.clone()),
        Expr::Select(select) if !select.test => {
            Some(format!("{}.{}", written(&select.operand)?, select.field))
        }
        Expr::Literal(LiteralValue::String(s)) => Some(format!("{:?}", s.inner())),
        Expr::Literal(LiteralValue::Int(i)) => Some(i.inner().to_string()),
        Expr::Call(call) if call.func_name == operators::INDEX => match call.args.as_slice() {
            [on, index] => Some(format!("{}[{}]", written(on)?, written(index)?)),
            _ => None,
        },
        Expr::Call(call) if !call.func_name.contains('_') => {
            let args: Option<Vec<String>> = call.args.iter().map(written).collect();
            let args = args?.join(", ");
            Some(match &call.target {
                Some(target) => format!("{}.{}({args})", written(target)?, call.func_name),
                None => format!("{}({args})", call.func_name),
            })
        }
        _ => None,
    }
}

fn context(input: &Input) -> Context<'static, 'static> {
    let mut ctx = Context::with_env(env().clone());
    ctx.add_variable_from_value("predicate", input.predicate.clone());
    ctx.add_variable_from_value("statement", input.statement.clone());
    ctx.add_variable_from_value("image", input.image.clone());
    ctx.add_variable_from_value("now", input.now.clone());
    ctx
}

/// A value as an explanation shows it: JSON-like, cut short.
fn show(value: &Value) -> String {
    let mut out = String::new();
    render(value, &mut out);
    if out.len() > MAX_SHOWN {
        let mut cut = MAX_SHOWN;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

fn render(value: &Value, out: &mut String) {
    if out.len() > MAX_SHOWN {
        return;
    }
    match value {
        Value::String(s) => {
            let _ = write!(out, "{:?}", s.as_str());
        }
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::UInt(u) => {
            let _ = write!(out, "{u}u");
        }
        Value::Float(f) => {
            let _ = write!(out, "{f}");
        }
        Value::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Value::Null => out.push_str("null"),
        Value::Timestamp(t) => {
            let _ = write!(out, "timestamp({:?})", t.to_rfc3339());
        }
        Value::Duration(d) => {
            let _ = write!(out, "duration(\"{}s\")", d.num_seconds());
        }
        Value::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                render(item, out);
            }
            out.push(']');
        }
        Value::Map(map) => {
            let mut entries: Vec<(String, &Value)> = map
                .map
                .iter()
                .map(|(k, v)| (format!("{:?}", Value::from(k)), v))
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            out.push('{');
            for (i, (key, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                match v {
                    _ if out.len() > MAX_SHOWN => break,
                    v => {
                        out.push_str(&key_text(&key));
                        out.push_str(": ");
                        render(v, out);
                    }
                }
            }
            out.push('}');
        }
        other => {
            let _ = write!(out, "{other:?}");
        }
    }
}

/// `String("a")` (the Debug of a key's value) as `"a"`.
fn key_text(debug: &str) -> String {
    debug
        .strip_prefix("String(")
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or(debug)
        .to_owned()
}

/// Runs `f` on a thread of its own with a [`STACK_BYTES`] stack, and waits for it.
pub fn on_large_stack<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, String> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("fixity-cel".to_owned())
            .stack_size(STACK_BYTES)
            .spawn_scoped(scope, f)
            .map_err(|e| format!("cannot start a thread for CEL: {e}"))?
            .join()
            .map_err(|_| "CEL evaluation failed unexpectedly".to_owned())
    })
}

/// Runs `f` on a thread of its own with a [`STACK_BYTES`] stack; the caller awaits it without
/// holding a thread.
pub async fn elsewhere<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fixity-cel".to_owned())
        .stack_size(STACK_BYTES)
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| format!("cannot start a thread for CEL: {e}"))?;
    rx.await
        .map_err(|_| "CEL evaluation failed unexpectedly".to_owned())
}

fn syntax_error(errors: &cel::ParseErrors) -> String {
    let each: Vec<String> = errors
        .errors
        .iter()
        .map(|e| {
            let what = if e.msg.contains("Recursion limit") {
                format!("nested deeper than {MAX_PARSE_DEPTH} levels")
            } else {
                e.msg.clone()
            };
            format!("column {}: {what}", e.pos.1)
        })
        .collect();
    format!("syntax: {}", each.join("; "))
}

/// The depth of the tree of operations.
fn depth(expr: &IdedExpr) -> usize {
    1 + match &expr.expr {
        Expr::Call(call) => call
            .target
            .iter()
            .map(|t| depth(t))
            .chain(call.args.iter().map(depth))
            .max()
            .unwrap_or(0),
        Expr::Select(select) => depth(&select.operand),
        Expr::List(list) => list.elements.iter().map(depth).max().unwrap_or(0),
        Expr::Map(map) => map
            .entries
            .iter()
            .map(|entry| match &entry.expr {
                EntryExpr::MapEntry(e) => depth(&e.key).max(depth(&e.value)),
                EntryExpr::StructField(f) => depth(&f.value),
            })
            .max()
            .unwrap_or(0),
        Expr::Struct(_) | Expr::Literal(_) | Expr::Ident(_) | Expr::Unspecified => 0,
        Expr::Comprehension(c) => [
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ]
        .into_iter()
        .map(depth)
        .max()
        .unwrap_or(0),
    }
}

/// What is known of an expression's type before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    /// Only the data knows (a field of the predicate, an element).
    Dyn,
    Int,
    Double,
    String,
    Bytes,
    Null,
    List,
    Map,
    Timestamp,
    Duration,
    Type,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Bool => "a bool",
            Kind::Dyn => "a value",
            Kind::Int => "a number",
            Kind::Double => "a double",
            Kind::String => "a string",
            Kind::Bytes => "bytes",
            Kind::Null => "null",
            Kind::List => "a list",
            Kind::Map => "a map",
            Kind::Timestamp => "a timestamp",
            Kind::Duration => "a duration",
            Kind::Type => "a type",
        }
    }
}

/// The result kind of a standard function, or None for one CEL here does not have.
fn function_kind(name: &str) -> Option<Kind> {
    Some(match name {
        operators::LOGICAL_AND
        | operators::LOGICAL_OR
        | operators::LOGICAL_NOT
        | operators::EQUALS
        | operators::NOT_EQUALS
        | operators::LESS
        | operators::LESS_EQUALS
        | operators::GREATER
        | operators::GREATER_EQUALS
        | operators::IN
        | operators::NOT_STRICTLY_FALSE
        | "startsWith"
        | "endsWith"
        | "contains"
        | "matches"
        | "bool" => Kind::Bool,
        operators::INDEX | "dyn" => Kind::Dyn,
        "size" | "int" | "uint" | "getDate" | "getDayOfMonth" | "getDayOfWeek" | "getDayOfYear"
        | "getFullYear" | "getHours" | "getMilliseconds" | "getMinutes" | "getMonth"
        | "getSeconds" => Kind::Int,
        "double" => Kind::Double,
        "string" => Kind::String,
        "bytes" => Kind::Bytes,
        "timestamp" => Kind::Timestamp,
        "duration" => Kind::Duration,
        "type" => Kind::Type,
        _ => return None,
    })
}

/// The variables in reach of an expression.
#[derive(Default, Clone)]
struct Scope<'e> {
    /// Variables bound by enclosing macros, innermost last.
    bound: Vec<(&'e str, Kind)>,
    /// In a macro's body: the names it may read besides `now` and `image`.
    body: Option<Vec<&'e str>>,
    /// Macros enclosing this expression.
    nesting: usize,
}

impl<'e> Scope<'e> {
    fn lookup(&self, name: &str) -> Option<Kind> {
        self.bound
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, k)| *k)
    }

    fn in_body(&self) -> bool {
        self.body.is_some()
    }

    /// Whether `expr` is a part of the innermost macro's element (a field, an index, or a
    /// `map`/`filter` of one).
    fn rooted(&self, expr: &IdedExpr) -> bool {
        let Some(allowed) = &self.body else {
            return true;
        };
        match &expr.expr {
            Expr::Ident(name) => allowed.contains(&name.as_str()),
            Expr::Select(select) => self.rooted(&select.operand),
            Expr::Call(call) if call.func_name == operators::INDEX => {
                call.args.first().is_some_and(|a| self.rooted(a))
            }
            Expr::Comprehension(c) => self.rooted(&c.iter_range),
            _ => false,
        }
    }
}

struct Checker;

impl Checker {
    fn check<'e>(&self, expr: &'e IdedExpr, scope: &Scope<'e>) -> Result<Kind, String> {
        match &expr.expr {
            Expr::Literal(literal) => Ok(match literal {
                LiteralValue::Boolean(_) => Kind::Bool,
                LiteralValue::Int(_) | LiteralValue::UInt(_) => Kind::Int,
                LiteralValue::Double(_) => Kind::Double,
                LiteralValue::String(_) => Kind::String,
                LiteralValue::Bytes(_) => Kind::Bytes,
                LiteralValue::Null => Kind::Null,
            }),
            Expr::Ident(name) => self.ident(name, scope),
            Expr::Select(select) => {
                self.check(&select.operand, scope)?;
                Ok(if select.test { Kind::Bool } else { Kind::Dyn })
            }
            Expr::Call(call) if accumulates(call) => {
                // `map` and `filter` append each result to their accumulator: `@result + [x]`.
                for e in call.args.iter().skip(1).flat_map(|list| match &list.expr {
                    Expr::List(list) => list.elements.iter(),
                    _ => [].iter(),
                }) {
                    self.check(e, scope)?;
                }
                Ok(Kind::List)
            }
            Expr::Call(call) => {
                if let Some(target) = &call.target {
                    self.check(target, scope)?;
                }
                let mut kinds = Vec::with_capacity(call.args.len());
                for arg in &call.args {
                    kinds.push(self.check(arg, scope)?);
                }
                let name = call.func_name.as_str();
                if name == operators::CONDITIONAL {
                    return Ok(match (kinds.get(1), kinds.get(2)) {
                        (Some(a), Some(b)) if a == b => *a,
                        _ => Kind::Dyn,
                    });
                }
                if name == operators::ADD && scope.in_body() && !call.args.iter().any(constant) {
                    return Err(
                        "inside all, exists, exists_one, map or filter, `+` needs a literal on one side: the work would grow with every element"
                            .to_owned(),
                    );
                }
                if name == "matches" {
                    match call.args.last().map(|a| &a.expr) {
                        Some(Expr::Literal(LiteralValue::String(p))) => {
                            remember_pattern(p.inner())?;
                        }
                        _ => return Err("matches takes a literal pattern".to_owned()),
                    }
                }
                match name {
                    operators::ADD
                    | operators::SUBSTRACT
                    | operators::MULTIPLY
                    | operators::DIVIDE
                    | operators::MODULO
                    | operators::NEGATE => Ok(arithmetic(&kinds)),
                    _ => function_kind(name).ok_or_else(|| format!("unknown function {name:?}")),
                }
            }
            Expr::List(list) => {
                for e in &list.elements {
                    self.literal_in_body(e, scope, "a list")?;
                }
                Ok(Kind::List)
            }
            Expr::Map(map) => {
                for entry in &map.entries {
                    match &entry.expr {
                        EntryExpr::MapEntry(e) => {
                            self.literal_in_body(&e.key, scope, "a map")?;
                            self.literal_in_body(&e.value, scope, "a map")?;
                        }
                        EntryExpr::StructField(_) => {
                            return Err("message fields are not supported".to_owned());
                        }
                    }
                }
                Ok(Kind::Map)
            }
            Expr::Struct(s) => Err(format!("message {:?} is not supported", s.type_name)),
            Expr::Comprehension(c) => self.comprehension(c, scope),
            Expr::Unspecified => Err("an incomplete expression".to_owned()),
        }
    }

    fn ident(&self, name: &str, scope: &Scope<'_>) -> Result<Kind, String> {
        if let Some(kind) = scope.lookup(name) {
            let visible = scope
                .body
                .as_ref()
                .is_none_or(|allowed| allowed.contains(&name));
            if !visible {
                return Err(format!(
                    "{name:?} is the variable of an enclosing macro; inside a macro's body only its own variable, now and image may be used"
                ));
            }
            return Ok(kind);
        }
        let kind = match name {
            "predicate" => Kind::Dyn,
            "statement" | "image" => Kind::Map,
            "now" => Kind::Timestamp,
            _ if TYPE_NAMES.contains(&name) => Kind::Type,
            _ => {
                return Err(format!(
                    "unknown variable {name:?} (conditions see {})",
                    VARIABLES.join(", ")
                ));
            }
        };
        if scope.in_body() && matches!(name, "predicate" | "statement") {
            return Err(format!(
                "{name} is used inside all, exists, exists_one, map or filter: it would be read again for every element; use the macro's variable (or hoist the comparison out of it)"
            ));
        }
        Ok(kind)
    }

    /// Inside a macro's body, list and map literals may hold only literals.
    fn literal_in_body<'e>(
        &self,
        e: &'e IdedExpr,
        scope: &Scope<'e>,
        what: &str,
    ) -> Result<(), String> {
        if scope.in_body() && !constant(e) {
            return Err(format!(
                "inside all, exists, exists_one, map or filter, {what} may hold only literals"
            ));
        }
        self.check(e, scope).map(|_| ())
    }

    fn comprehension<'e>(
        &self,
        c: &'e cel::common::ast::ComprehensionExpr,
        scope: &Scope<'e>,
    ) -> Result<Kind, String> {
        if scope.nesting >= MAX_MACRO_NESTING {
            return Err(format!(
                "macros (all, exists, map, ...) nest at most {MAX_MACRO_NESTING} deep"
            ));
        }
        if !scope.rooted(&c.iter_range) {
            return Err(
                "a macro inside another's body must range over a part of that macro's element (each element would otherwise cost a pass over the whole range)"
                    .to_owned(),
            );
        }
        self.check(&c.iter_range, scope)?;
        let accu = self.check(&c.accu_init, scope)?;
        let mut vars = vec![c.iter_var.as_str(), c.accu_var.as_str()];
        vars.extend(c.iter_var2.as_deref());
        let mut body = scope.clone();
        body.nesting += 1;
        body.bound.push((c.accu_var.as_str(), accu));
        body.bound.push((c.iter_var.as_str(), Kind::Dyn));
        if let Some(v) = &c.iter_var2 {
            body.bound.push((v.as_str(), Kind::Dyn));
        }
        body.body = Some(vars);
        self.check(&c.loop_cond, &body)?;
        self.check(&c.loop_step, &body)?;
        let mut result = scope.clone();
        result.bound.push((c.accu_var.as_str(), accu));
        if let Some(allowed) = result.body.as_mut() {
            allowed.push(c.accu_var.as_str());
        }
        self.check(&c.result, &result)
    }
}

/// The step of a `map` or `filter`: the accumulator (a name users cannot write) plus a list.
fn accumulates(call: &cel::common::ast::CallExpr) -> bool {
    call.func_name == operators::ADD
        && call.target.is_none()
        && matches!(call.args.as_slice(), [accu, list]
            if matches!(&accu.expr, Expr::Ident(name) if name.starts_with('@'))
                && matches!(list.expr, Expr::List(_)))
}

/// A literal, or a list or map of literals.
fn constant(e: &IdedExpr) -> bool {
    match &e.expr {
        Expr::Literal(_) => true,
        Expr::List(list) => list.elements.iter().all(constant),
        Expr::Map(map) => map.entries.iter().all(|entry| match &entry.expr {
            EntryExpr::MapEntry(e) => constant(&e.key) && constant(&e.value),
            EntryExpr::StructField(_) => false,
        }),
        Expr::Call(call) if matches!(call.func_name.as_str(), "duration" | "timestamp") => {
            call.args.iter().all(constant)
        }
        _ => false,
    }
}

/// The kind of `+`, `-`, `*`, `/`, `%` or negation: never a bool.
fn arithmetic(kinds: &[Kind]) -> Kind {
    let known: Vec<Kind> = kinds.iter().copied().filter(|k| *k != Kind::Dyn).collect();
    match known.as_slice() {
        [] => Kind::Int,
        [Kind::Timestamp, Kind::Duration] | [Kind::Duration, Kind::Timestamp] => Kind::Timestamp,
        [Kind::Timestamp, Kind::Timestamp] => Kind::Duration,
        [k, ..] => *k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn input(predicate: serde_json::Value) -> Input {
        Input::new(
            serde_json::json!({
                "_type": "https://in-toto.io/Statement/v1",
                "predicateType": "https://slsa.dev/provenance/v1",
                "subject": [{"name": "app", "digest": {"sha256": "ab"}}],
                "predicate": predicate,
            }),
            ("ghcr.io", "acme/app", "sha256:ab"),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        )
        .unwrap()
    }

    fn refused(expression: &str) -> String {
        Condition::compile(expression, None).unwrap_err()
    }

    #[test]
    fn syntax_errors_unknown_names_and_non_bool_results_are_refused() {
        assert!(refused("predicate.a ==").starts_with("syntax:"));
        assert!(refused("builder.id == 'x'").contains("unknown variable \"builder\""));
        assert!(refused("frobnicate(predicate.a)").contains("unknown function"));
        for (expression, kind) in [
            ("1 + 2", "a number"),
            ("'text'", "a string"),
            ("size(predicate.a)", "a number"),
            ("predicate.a.map(x, x)", "a list"),
            ("now", "a timestamp"),
            ("{'a': true}", "a map"),
        ] {
            assert!(
                refused(expression).contains(&format!("returns {kind}")),
                "{expression}: {}",
                refused(expression)
            );
        }
        assert!(refused("predicate.a.matches(predicate.b)").contains("literal pattern"));
        assert!(refused("predicate.a.matches('(')").contains("matches:"));
        for ok in [
            "predicate.a",
            "true",
            "predicate.a == 'b'",
            "has(predicate.a) && predicate.a.startsWith('x')",
            "predicate.l.all(x, x.severity != 'CRITICAL')",
            "predicate.l.exists_one(x, x == 1)",
            "type(predicate.a) == string",
            "predicate.a ? predicate.b : false",
            "now - timestamp(predicate.t) < duration('168h')",
            "predicate.id.matches('^https://github[.]com/acme/')",
        ] {
            assert!(
                Condition::compile(ok, None).is_ok(),
                "{ok}: {:?}",
                Condition::compile(ok, None)
            );
        }
    }

    #[test]
    fn size_and_nesting_are_bounded() {
        let long = format!("predicate.a == '{}'", "x".repeat(MAX_EXPRESSION_BYTES));
        assert!(refused(&long).contains("more than the 1024 allowed"));
        let deep = format!("{}true{}", "(".repeat(80), ")".repeat(80));
        assert!(
            refused(&deep).contains("nested deeper than 32"),
            "{}",
            refused(&deep)
        );
        let chain = format!("predicate{} == 1", ".a".repeat(100));
        assert!(
            refused(&chain).contains("deeper than 64"),
            "{}",
            refused(&chain)
        );
        let nested = "predicate.a.all(a, a.b.all(b, b.c.all(c, c.d.all(d, d))))";
        assert!(refused(nested).contains("nest at most 3"));
        assert!(Condition::compile("predicate.a.all(a, a.b.all(b, b.c.all(c, c)))", None).is_ok());
    }

    #[test]
    fn what_would_grow_faster_than_the_input_is_refused_in_a_macro_body() {
        for (expression, why) in [
            (
                "predicate.l.all(x, x == predicate.s)",
                "read again for every element",
            ),
            (
                "predicate.l.all(x, predicate.l.all(y, x == y))",
                "must range over a part",
            ),
            ("predicate.l.all(x, x.m.all(y, y == x))", "enclosing macro"),
            (
                "predicate.l.map(x, x + x).all(y, y != '')",
                "`+` needs a literal",
            ),
            (
                "predicate.l.map(x, [x, x]).all(y, size(y) > 0)",
                "may hold only literals",
            ),
            (
                "predicate.l.map(x, {'a': x}).all(y, true)",
                "may hold only literals",
            ),
        ] {
            assert!(
                refused(expression).contains(why),
                "{expression}: {}",
                refused(expression)
            );
        }
        for ok in [
            "predicate.l.all(x, x.sev in ['HIGH', 'CRITICAL'] == false)",
            "predicate.l.all(x, x.n + 1 > 0)",
            "predicate.l.all(x, x.m.all(y, y.sev != 'CRITICAL'))",
            "predicate.l.filter(x, x.ok).all(y, y.sev != 'CRITICAL')",
            "predicate.l.all(x, timestamp(x.t) < now)",
        ] {
            assert!(
                Condition::compile(ok, None).is_ok(),
                "{ok}: {:?}",
                Condition::compile(ok, None)
            );
        }
    }

    #[test]
    fn conditions_pass_fail_with_what_they_saw_or_error() {
        let predicate = serde_json::json!({
            "builder": {"id": "https://github.com/evil/x"},
            "vulns": [{"id": "CVE-1", "severity": "LOW"}, {"id": "CVE-2", "severity": "CRITICAL"}],
            "finished": "2027-01-01T00:00:00Z",
        });
        let input = input(predicate);
        let ok = Condition::compile("image.repository == 'acme/app'", None).unwrap();
        assert_eq!(ok.evaluate(&input), Ok(()));

        let builder = Condition::compile(
            "predicate.builder.id == 'https://github.com/acme/x'",
            Some("built by our workflow"),
        )
        .unwrap();
        assert_eq!(
            builder.evaluate(&input),
            Err(Failure::False {
                message: "built by our workflow".into(),
                saw: Some("predicate.builder.id = \"https://github.com/evil/x\"".into()),
            })
        );
        let critical =
            Condition::compile("predicate.vulns.all(v, v.severity != 'CRITICAL')", None).unwrap();
        match critical.evaluate(&input) {
            Err(Failure::False { saw: Some(saw), .. }) => {
                assert!(
                    saw.contains("\"CVE-2\"") && saw.contains("v.severity = \"CRITICAL\""),
                    "{saw}"
                );
            }
            other => panic!("{other:?}"),
        }
        let fresh = Condition::compile(
            "now - timestamp(predicate.finished) < duration('168h')",
            Some("scanned within 7 days"),
        )
        .unwrap();
        assert!(matches!(fresh.evaluate(&input), Err(Failure::False { .. })));

        let absent = Condition::compile("predicate.runDetails.builder.id == 'x'", None).unwrap();
        match absent.evaluate(&input) {
            Err(Failure::Error { error, .. }) => assert!(error.contains("runDetails"), "{error}"),
            other => panic!("{other:?}"),
        }
        let not_bool = Condition::compile("predicate.builder", None).unwrap();
        match not_bool.evaluate(&input) {
            Err(Failure::Error { error, .. }) => assert!(error.contains("not a bool"), "{error}"),
            other => panic!("{other:?}"),
        }
        let pattern = Condition::compile(
            "predicate.builder.id.matches('^https://github.com/acme/')",
            None,
        )
        .unwrap();
        assert!(matches!(
            pattern.evaluate(&input),
            Err(Failure::False { .. })
        ));
    }

    /// The parts of the predicate a set of conditions reads give every condition the answer
    /// the whole predicate gives, on predicates of several shapes: the same value or the same
    /// error from CEL, and from `hold` the same result and the same failure.
    #[test]
    fn conditions_answer_alike_on_the_parts_they_read_and_on_the_whole() {
        let predicates = [
            serde_json::json!({
                "builder": {"id": "https://github.com/acme/x", "version": {"v": 1}},
                "scanner": {"result": {"Results": [
                    {"Target": "app", "Vulnerabilities": [
                        {"VulnerabilityID": "CVE-1", "Severity": "LOW", "Title": "t"},
                        {"VulnerabilityID": "CVE-2", "Severity": "CRITICAL", "Title": "t"},
                    ]},
                    {"Target": "base"},
                    {"Target": "lib", "Vulnerabilities": []},
                ]}},
                "metadata": {"scanFinishedOn": "2026-11-30T10:01:00Z", "labels": {"team": "a", "tier": "1"}},
                "tags": ["x", "y"],
                "approvals": [{"team": "platform"}, {"team": "security"}],
                "n": 3,
            }),
            serde_json::json!({
                "builder": "not a map",
                "scanner": {"result": {"Results": "not a list"}},
                "metadata": {"scanFinishedOn": 5, "labels": ["team"]},
                "tags": {"x": 1},
                "approvals": [1, "two", null],
            }),
            serde_json::json!({
                "scanner": {"result": {"Results": [{"Target": "app", "Vulnerabilities": [
                    {"Severity": "LOW"}, {"Severity": "HIGH"}]}]}},
                "metadata": {"scanFinishedOn": "2026-11-01T00:00:00Z"},
            }),
            serde_json::json!([1, 2, 3]),
            serde_json::json!(null),
        ];
        let expressions = [
            "predicate.builder.id == 'https://github.com/acme/x'",
            "predicate['builder']['id'].startsWith('https://github.com/')",
            "has(predicate.builder.id) && has(predicate.builder.nothing) == false",
            "has(predicate.builder)",
            "predicate.builder.version == {'v': 1}",
            "predicate.scanner.result.Results.all(r, !has(r.Vulnerabilities) || r.Vulnerabilities.all(v, v.Severity != 'CRITICAL'))",
            "predicate.scanner.result.Results.exists(r, r.Target == 'base')",
            "predicate.scanner.result.Results.exists_one(r, has(r.Vulnerabilities))",
            "predicate.scanner.result.Results.all(r, true)",
            "size(predicate.scanner.result.Results) == 3",
            "predicate.scanner.result.Results[0].Target == 'app'",
            "predicate.scanner.result.Results[0].Vulnerabilities[1].Severity == 'CRITICAL'",
            "predicate.scanner.result.Results.map(r, r.Target).exists(t, t == 'lib')",
            "predicate.scanner.result.Results.filter(r, has(r.Vulnerabilities)).all(r, size(r.Vulnerabilities) < 3)",
            "now - timestamp(predicate.metadata.scanFinishedOn) < duration('168h')",
            "predicate.metadata.labels.all(k, k != 'owner')",
            "predicate.metadata.labels.exists(k, k == 'team')",
            "'team' in predicate.metadata.labels",
            "predicate.tags.exists(t, t == 'y')",
            "predicate.tags[predicate.n - 2] == 'y'",
            "predicate.approvals.exists(a, a.team == 'security')",
            "type(predicate.approvals) == list",
            "predicate.n > 2 ? predicate.builder.id != '' : false",
            "predicate.builder.id.matches('^https://github[.]com/acme/')",
            "[1, 2].all(predicate, predicate > 0) && predicate.n == 3",
            "statement.predicateType.startsWith('https://') && image.repository == 'acme/app'",
            "predicate.absent.field == 1",
            "predicate == {}",
        ];
        let statement = |predicate: &serde_json::Value| {
            serde_json::json!({
                "_type": "https://in-toto.io/Statement/v1",
                "predicateType": "https://slsa.dev/provenance/v1",
                "subject": [{"name": "app", "digest": {"sha256": "ab"}}],
                "predicate": predicate,
            })
        };
        let image = ("ghcr.io", "acme/app", "sha256:ab");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        on_large_stack(|| {
            let conditions: Vec<Condition> = expressions
                .iter()
                .map(|e| Condition::compile_here(e, None).unwrap_or_else(|e| panic!("{e}")))
                .collect();
            let whole: Vec<&str> = conditions
                .iter()
                .filter(|c| c.reads.is_whole())
                .map(|c| c.expression.as_str())
                .collect();
            assert_eq!(whole, ["predicate == {}"]);
            // What all the others read together.
            let mut all = Reads::default();
            for c in conditions.iter().filter(|c| !c.reads.is_whole()) {
                all.merge(&c.reads);
            }
            for predicate in &predicates {
                let statement = statement(predicate);
                let whole = Input::new(statement.clone(), image, now).unwrap();
                let outcome = |input: &Input, c: &Condition| {
                    Value::resolve(&c.expr, &context(input)).map_err(|e| e.to_string())
                };
                for c in &conditions {
                    let own = Input::reading(&statement, &c.reads, image, now).unwrap();
                    let shared = Input::reading(&statement, &all, image, now).unwrap();
                    let expected = outcome(&whole, c);
                    assert_eq!(
                        outcome(&own, c),
                        expected,
                        "{} on {predicate}",
                        c.expression
                    );
                    assert_eq!(
                        outcome(&shared, c),
                        expected,
                        "{} on {predicate}",
                        c.expression
                    );
                }
                // In threes, all but the last (which reads the whole predicate), and all.
                let parts = &conditions[..conditions.len() - 1];
                for set in conditions.chunks(3).chain([parts, &conditions]) {
                    let before = set.iter().try_for_each(|c| c.evaluate(&whole));
                    assert_eq!(hold(set, statement.clone(), image, now), before);
                }
            }
        })
        .unwrap();
    }

    /// Only what is read is converted: a scan's other fields, and the findings' other fields,
    /// are left out.
    #[test]
    fn only_the_fields_read_are_kept() {
        let c = Condition::compile(
            "predicate.scanner.result.Results.all(r, !has(r.Vulnerabilities) || r.Vulnerabilities.all(v, v.Severity != 'CRITICAL'))",
            None,
        )
        .unwrap();
        let predicate = serde_json::json!({
            "scanner": {"uri": "trivy", "result": {"Results": [
                {"Target": "app", "Vulnerabilities": [{"VulnerabilityID": "CVE-1", "Severity": "LOW"}]},
                {"Target": "base"},
            ]}},
            "metadata": {"scanFinishedOn": "2026-11-30T10:01:00Z"},
        });
        assert_eq!(
            c.reads.prune(&predicate),
            serde_json::json!({"scanner": {"result": {"Results": [
                {"Vulnerabilities": [{"Severity": "LOW"}]},
                {},
            ]}}})
        );
        let whole =
            Condition::compile("predicate.scanner == {} || size(predicate) > 0", None).unwrap();
        assert!(whole.reads.is_whole());
    }
}
