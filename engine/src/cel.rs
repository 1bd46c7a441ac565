//! CEL conditions of a policy (`when`, `escalateWhen`), compiled once and evaluated over the
//! variables `args` (the call's arguments), `run` (the run so far) and `agent` (who calls).
//! An evaluation error is reported to the caller, which fails closed.

use std::sync::Arc;

use cel::{Context, Env, Program, Value};

mod native;

/// The variables a condition may use.
pub const VARIABLES: [&str; 3] = ["args", "run", "agent"];

/// A compiled CEL condition.
pub(crate) struct Condition {
    program: Program,
    source: Arc<str>,
    // Building the standard environment costs tens of microseconds, so it is built once per
    // condition, at compile time, and shared by every evaluation.
    env: Arc<Env>,
    uses: [bool; 3],
    /// The same condition evaluated natively over the JSON, when it has only shapes that path
    /// knows; the interpreter answers whatever it does not.
    native: Option<native::Native>,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Condition")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Condition {
    pub(crate) fn compile(source: &str) -> Result<Self, String> {
        let env = Arc::new(Env::stdlib());
        let program = env
            .compile(source)
            .map_err(|e| format!("invalid CEL: {e}"))?;
        let references = program.references();
        let uses = VARIABLES.map(|v| references.has_variable(v));
        let mut unknown: Vec<&str> = references
            .variables()
            .into_iter()
            // Type names (`string`, `int`, `list`, ...) are identifiers too: `type(x) == string`.
            .filter(|v| {
                !VARIABLES.contains(v)
                    && !is_bound_in(source, v)
                    && env.types().find_type(v).is_none()
            })
            .collect();
        unknown.sort_unstable();
        if !unknown.is_empty() {
            return Err(format!(
                "unknown variable(s) {}; a condition may use args, run and agent",
                unknown.join(", ")
            ));
        }
        let native = native::Native::compile(program.expression());
        Ok(Self {
            program,
            source: source.into(),
            env,
            uses,
            native,
        })
    }

    /// Whether the condition reads `run`.
    pub(crate) fn uses_run(&self) -> bool {
        self.uses[1]
    }

    /// Whether the condition reads `agent`.
    pub(crate) fn uses_agent(&self) -> bool {
        self.uses[2]
    }

    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to a bool; any other result or an error is an `Err` with the reason.
    pub(crate) fn evaluate(
        &self,
        args: &serde_json::Value,
        run: &serde_json::Value,
        agent: &serde_json::Value,
    ) -> Result<bool, String> {
        if let Some(answer) = self
            .native
            .as_ref()
            .and_then(|native| native.evaluate([args, run, agent]))
        {
            return Ok(answer);
        }
        self.interpret(args, run, agent)
    }

    /// Whether the condition has a native form (for tests and benchmarks).
    #[cfg(test)]
    pub(crate) fn is_native(&self) -> bool {
        self.native.is_some()
    }

    /// The interpreter's answer: the reference the native path must agree with, and the one
    /// that words every error.
    pub(crate) fn interpret(
        &self,
        args: &serde_json::Value,
        run: &serde_json::Value,
        agent: &serde_json::Value,
    ) -> Result<bool, String> {
        let mut context = Context::with_env(self.env.clone());
        for (i, (name, value)) in [("args", args), ("run", run), ("agent", agent)]
            .into_iter()
            .enumerate()
        {
            if !self.uses[i] {
                continue;
            }
            let value =
                cel::to_value(value).map_err(|e| format!("{name} cannot be given to CEL: {e}"))?;
            context.add_variable_from_value(name, value);
        }
        match self.program.execute(&context) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("the condition returned {other:?}, not a bool")),
            Err(e) => Err(format!("the condition failed: {e}")),
        }
    }
}

/// Whether `name` is bound by a comprehension macro in `source`, such as `id` in
/// `args.ids.all(id, id.startsWith('O-'))`; the parser reports such names as variables.
fn is_bound_in(source: &str, name: &str) -> bool {
    ["all(", "exists(", "exists_one(", "map(", "filter("]
        .iter()
        .any(|m| {
            source.contains(&format!("{m}{name},")) || source.contains(&format!("{m}{name} ,"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn evaluates_over_args_run_and_agent() {
        let condition = Condition::compile(
            "args.ids.all(id, id.startsWith('O-')) && run.step < 10 && agent.name == 'a'",
        )
        .unwrap();
        let run = json!({"step": 3});
        let agent = json!({"name": "a"});
        assert_eq!(
            condition.evaluate(&json!({"ids": ["O-1", "O-2"]}), &run, &agent),
            Ok(true)
        );
        assert_eq!(
            condition.evaluate(&json!({"ids": ["O-1", "X-2"]}), &run, &agent),
            Ok(false)
        );
        assert!(
            condition.evaluate(&json!({}), &run, &agent).is_err(),
            "a missing field fails, and the caller fails closed"
        );
    }

    #[test]
    fn refuses_bad_conditions_at_compile_time() {
        assert!(
            Condition::compile("args.x ==")
                .unwrap_err()
                .contains("invalid CEL")
        );
        assert!(
            Condition::compile("secret == 1")
                .unwrap_err()
                .contains("unknown variable(s) secret")
        );
        let non_bool = Condition::compile("args.x").unwrap();
        assert!(
            non_bool
                .evaluate(&json!({"x": 1}), &json!({}), &json!({}))
                .unwrap_err()
                .contains("not a bool")
        );
    }
}
