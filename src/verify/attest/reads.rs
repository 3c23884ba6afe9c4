//! What part of the predicate a condition reads, found in its parsed tree, so that only that
//! part is converted into CEL values: a scan lists hundreds of findings with a dozen fields
//! each, and a condition that reads one field of each needs none of the others. Converting the
//! whole predicate was most of a condition's cost on a cache miss (`cargo bench --bench review
//! -- conditions` measures both ways).
//!
//! A path read off `predicate` by fields (`predicate.a.b`, `predicate['a']`), by a literal index
//! (`l[0]`: every element is kept, pruned alike, so positions and lengths do not change) or
//! through a macro's variable (`l.all(x, x.f)`: the field `f` of each element) is kept only as
//! deep as it is read. Anything else keeps the value whole: a path compared, passed to a
//! function, indexed by a computed key, ranged over by a two-variable macro or a macro over a
//! map (whose variable is each key), and `predicate` itself used as a value. A field only
//! tested with `has()` is kept with a null value.
//!
//! Where the data does not have the shape the path expects (a field read off a list, a macro
//! over a string), the value is kept as it is, so that the evaluation meets what it would have
//! met in the whole predicate: the same values where it reads, the same errors where it fails.

use std::collections::BTreeMap;

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue, operators};
use serde_json::Value;

/// One step down a path from `predicate`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Field(String),
    /// Every element of a list.
    Each,
}

/// The parts of a value that expressions read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reads {
    /// Read as a whole.
    whole: bool,
    /// Fields read off it, when it is a map.
    fields: BTreeMap<String, Reads>,
    /// What is read off each of its elements, when it is a list.
    each: Option<Box<Reads>>,
}

impl Reads {
    /// What `expr` reads of `predicate`.
    pub fn of(expr: &IdedExpr) -> Self {
        let mut reads = Reads::default();
        walk(expr, &mut Vec::new(), &mut reads);
        reads
    }

    /// What either reads.
    pub fn merge(&mut self, other: &Reads) {
        self.whole |= other.whole;
        for (field, reads) in &other.fields {
            self.fields.entry(field.clone()).or_default().merge(reads);
        }
        if let Some(each) = &other.each {
            self.each.get_or_insert_default().merge(each);
        }
    }

    /// Whether all of the value is read.
    pub fn is_whole(&self) -> bool {
        self.whole
    }

    fn at(&mut self, path: &[Step]) -> &mut Reads {
        path.iter().fold(self, |reads, step| match step {
            Step::Field(field) => reads.fields.entry(field.clone()).or_default(),
            Step::Each => reads.each.get_or_insert_default(),
        })
    }

    /// The part of `value` that is read, copied.
    pub fn prune(&self, value: &Value) -> Value {
        if self.whole {
            return value.clone();
        }
        match value {
            Value::Object(map) if self.each.is_none() => Value::Object(
                self.fields
                    .iter()
                    .filter_map(|(field, reads)| {
                        map.get(field).map(|v| (field.clone(), reads.prune(v)))
                    })
                    .collect(),
            ),
            Value::Array(items) if self.fields.is_empty() => match &self.each {
                Some(each) => Value::Array(items.iter().map(|v| each.prune(v)).collect()),
                // Only its presence was tested.
                None => Value::Null,
            },
            _ if self.fields.is_empty() && self.each.is_none() => Value::Null,
            other => other.clone(),
        }
    }
}

/// The variables of enclosing macros, innermost last, with the path each stands for when it
/// is a part of the predicate.
type Scope<'e> = Vec<(&'e str, Option<Vec<Step>>)>;

/// The path `expr` is, when it is a part of the predicate reached by fields and literal
/// indexes.
fn path(expr: &IdedExpr, scope: &Scope<'_>) -> Option<Vec<Step>> {
    match &expr.expr {
        Expr::Ident(name) => match scope.iter().rev().find(|(n, _)| n == name) {
            Some((_, bound)) => bound.clone(),
            None => (name == "predicate").then(Vec::new),
        },
        Expr::Select(select) if !select.test => {
            let mut path = path(&select.operand, scope)?;
            path.push(Step::Field(select.field.clone()));
            Some(path)
        }
        Expr::Call(call) if call.func_name == operators::INDEX && call.target.is_none() => {
            let [on, index] = call.args.as_slice() else {
                return None;
            };
            let step = match &index.expr {
                Expr::Literal(LiteralValue::String(field)) => Step::Field(field.inner().to_owned()),
                Expr::Literal(_) => Step::Each,
                _ => return None,
            };
            let mut path = path(on, scope)?;
            path.push(step);
            Some(path)
        }
        _ => None,
    }
}

/// Records in `reads` what `expr` reads of the predicate.
fn walk<'e>(expr: &'e IdedExpr, scope: &mut Scope<'e>, reads: &mut Reads) {
    if let Some(path) = path(expr, scope) {
        reads.at(&path).whole = true;
        return;
    }
    match &expr.expr {
        Expr::Select(select) => match path(&select.operand, scope) {
            // `has(x.f)`: the presence of `f`, not its value.
            Some(on) if select.test => {
                reads
                    .at(&on)
                    .fields
                    .entry(select.field.clone())
                    .or_default();
            }
            _ => walk(&select.operand, scope, reads),
        },
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                walk(target, scope, reads);
            }
            for arg in &call.args {
                walk(arg, scope, reads);
            }
        }
        Expr::List(list) => {
            for e in &list.elements {
                walk(e, scope, reads);
            }
        }
        Expr::Map(map) => {
            for entry in &map.entries {
                match &entry.expr {
                    EntryExpr::MapEntry(e) => {
                        walk(&e.key, scope, reads);
                        walk(&e.value, scope, reads);
                    }
                    EntryExpr::StructField(f) => walk(&f.value, scope, reads),
                }
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                if let EntryExpr::StructField(f) = &entry.expr {
                    walk(&f.value, scope, reads);
                }
            }
        }
        Expr::Comprehension(c) => {
            let range = match &c.iter_var2 {
                None => path(&c.iter_range, scope),
                Some(_) => None,
            };
            let element = match range {
                Some(mut range) => {
                    reads.at(&range).each.get_or_insert_default();
                    range.push(Step::Each);
                    Some(range)
                }
                None => {
                    walk(&c.iter_range, scope, reads);
                    None
                }
            };
            walk(&c.accu_init, scope, reads);
            let outer = scope.len();
            scope.push((c.accu_var.as_str(), None));
            scope.push((c.iter_var.as_str(), element));
            if let Some(second) = &c.iter_var2 {
                scope.push((second.as_str(), None));
            }
            walk(&c.loop_cond, scope, reads);
            walk(&c.loop_step, scope, reads);
            scope.truncate(outer + 1);
            walk(&c.result, scope, reads);
            scope.truncate(outer);
        }
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}
