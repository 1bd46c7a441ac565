//! SQL both stores share. SQLite reads `$1` as a parameter named "$1" and numbers parameters by
//! first appearance, so numbering them in order of appearance makes one text serve both.

use crate::store::Query;

/// A bound parameter.
#[derive(Debug, Clone)]
pub(crate) enum Param {
    Text(String),
    Int(i64),
}

/// A WHERE … ORDER BY … LIMIT clause and its parameters.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    /// WHERE, ORDER BY and LIMIT.
    pub sql: String,
    /// The WHERE part alone (empty without conditions), without the cursor: what a census
    /// counts.
    pub conditions: String,
    pub params: Vec<Param>,
    /// The numbers of the agent's, the since time's and the until time's parameters, if given
    /// (SQLite's query reads its agent index with them).
    pub agent: Option<usize>,
    pub since: Option<usize>,
    pub until: Option<usize>,
}

impl Filter {
    /// The clause for `query`. A run, when given, is always parameter `$1` (SQLite's query
    /// reads its run index with it).
    pub fn of(query: &Query) -> Self {
        let mut clauses = Vec::new();
        let mut params = Vec::new();
        // Each adds its condition if given and answers its parameter's number.
        let mut text = |column: &str, value: &Option<String>| {
            let value = value.as_ref()?;
            params.push(Param::Text(value.clone()));
            clauses.push(format!("{column} = ${}", params.len()));
            Some(params.len())
        };
        text("run", &query.run);
        let agent = text("agent", &query.agent);
        text("tool", &query.tool);
        text("event", &query.event);
        let mut since = None;
        if let Some(time) = query.since_us {
            params.push(Param::Int(time));
            since = Some(params.len());
            clauses.push(format!("time_us >= ${}", params.len()));
        }
        let mut until = None;
        if let Some(time) = query.until_us {
            params.push(Param::Int(time));
            until = Some(params.len());
            clauses.push(format!("time_us < ${}", params.len()));
        }
        let conditions = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        if let Some(cursor) = &query.after {
            params.push(Param::Int(cursor.time_us));
            params.push(Param::Text(cursor.chain.clone()));
            params.push(Param::Int(i64::try_from(cursor.seq).unwrap_or(i64::MAX)));
            let n = params.len();
            clauses.push(format!(
                "(time_us > ${} OR (time_us = ${} AND (chain > ${} OR (chain = ${} AND seq > ${}))))",
                n - 2,
                n - 2,
                n - 1,
                n - 1,
                n
            ));
        }
        let mut sql = String::new();
        if !clauses.is_empty() {
            sql.push_str("WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        sql.push_str(" ORDER BY time_us, chain, seq");
        if let Some(limit) = query.limit {
            params.push(Param::Int(i64::try_from(limit).unwrap_or(i64::MAX)));
            sql.push_str(&format!(" LIMIT ${}", params.len()));
        }
        Self {
            sql,
            conditions,
            params,
            agent,
            since,
            until,
        }
    }
}

pub(crate) const TALLIES: &str = "SELECT agent, tool, event, outcome, COUNT(*), MAX(time_us) \
     FROM tollgate_audit_records \
     WHERE time_us >= $1 AND time_us < $2 AND agent IS NOT NULL AND tool IS NOT NULL \
     GROUP BY agent, tool, event, outcome";

pub(crate) const TOOL_USE: &str = "SELECT agent, tool, COUNT(*), \
     SUM(CASE WHEN outcome = 'allow' THEN 1 ELSE 0 END), MAX(time_us) \
     FROM tollgate_audit_records \
     WHERE event = 'decide' AND agent IS NOT NULL AND tool IS NOT NULL \
       AND time_us >= $1 AND time_us < $2 \
     GROUP BY agent, tool ORDER BY agent, tool";

pub(crate) const OUTCOMES: &str = "SELECT tool, outcome, COUNT(*) \
     FROM tollgate_audit_records \
     WHERE agent = $1 AND time_us >= $2 AND tool IS NOT NULL AND outcome IS NOT NULL \
     GROUP BY tool, outcome ORDER BY tool, outcome";

pub(crate) const LAST_BEFORE: &str = "SELECT seq, hash FROM tollgate_audit_records \
     WHERE chain = $1 AND time_us < $2 \
     ORDER BY seq DESC LIMIT 1";
