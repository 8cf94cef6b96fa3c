//! `tandem rebalance` (and `rule add --enforce`): shows the cluster's rebalancing plan, then —
//! confirmed on the terminal or with `--yes` — carries it out as live migrations, at most
//! `--parallel` at once, in the plan's order (a later move may count on the room an earlier one
//! freed, so each batch ends before the next begins). Each move is judged again by the cluster
//! when it is asked for: one it refuses now (its VM stopped or moved meanwhile, the FTT target)
//! is reported and the others go on.

use super::args::RebalanceArgs;
use super::output::{print_table, Output};
use std::io::{BufRead, IsTerminal, Write};
use tandem::client::{decode, Client, ClientError};
use tandem_agent::views::{MigrateRequest, MigrationBegun, RebalanceMoveView, RebalanceView};

/// How one move ended: `Ok` with a word for the table, or why it did not happen.
type MoveResult = Result<String, String>;

pub fn run(c: &Client, out: Output, args: &RebalanceArgs) -> Result<(), ClientError> {
    let mut path = format!("/v1/rebalance?balance={}", !args.no_balance);
    if let Some(r) = &args.rule {
        path.push_str(&format!("&rule={r}"));
    }
    let plan: RebalanceView = decode(c.get(&path)?)?;
    if out == Output::Json && (args.dry_run || plan.moves.is_empty()) {
        println!("{}", serde_json::to_string(&plan).unwrap_or_default());
        return Ok(());
    }
    if out == Output::Table {
        print_plan(&plan);
    }
    if args.dry_run || plan.moves.is_empty() {
        return Ok(());
    }
    if !args.yes && !confirmed(plan.moves.len())? {
        println!("nothing moved");
        return Ok(());
    }
    let results = carry_out(c, &plan.moves, args.parallel.max(1) as usize, out == Output::Table);
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    if out == Output::Json {
        let v: Vec<serde_json::Value> =
            results.iter().map(|(m, r)| serde_json::json!({"vm": m.vm, "to": m.to, "completed": r.is_ok(), "why": r.as_ref().err()})).collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        println!("{} of {} moves completed", results.len() - failed, results.len());
    }
    if failed > 0 {
        return Err(ClientError::Refused { status: 409, message: format!("{failed} move(s) did not complete") });
    }
    Ok(())
}

fn print_plan(plan: &RebalanceView) {
    if plan.moves.is_empty() {
        println!("nothing to move (memory use spread {} points)", plan.spread_before_pct);
    } else {
        let mut rows = vec![["VM", "FROM", "TO", "WHY"].map(String::from).to_vec()];
        for m in &plan.moves {
            let why = m.rule.as_ref().map_or_else(|| "even out memory".to_string(), |r| format!("rule {r}"));
            rows.push(vec![m.vm.clone(), m.from.clone(), m.to.clone(), why]);
        }
        print_table(&rows);
        println!("memory use spread: {} → {} points between the most and the least used host", plan.spread_before_pct, plan.spread_after_pct);
    }
    for u in &plan.unfixable {
        println!("cannot fix: {} breaks rule {}: {}", u.vm, u.rule, u.why);
    }
}

/// Asks on the terminal; refuses to guess when there is none.
fn confirmed(moves: usize) -> Result<bool, ClientError> {
    if !std::io::stdin().is_terminal() {
        return Err(ClientError::Usage("not a terminal: add --yes to carry out the plan, or --dry-run".into()));
    }
    print!("carry out {moves} live migration(s)? [y/N] ");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

/// One move: asked, then followed on its source until committed state says how it ended.
fn one_move(c: &Client, m: &RebalanceMoveView) -> MoveResult {
    let answer = c.send("POST", &format!("/v1/vms/{}/migrate", m.vm), &MigrateRequest { to: Some(m.to.clone()), force: false }).map_err(|e| e.to_string())?;
    let begun: MigrationBegun = decode(answer).map_err(|e| e.to_string())?;
    let source = Client { addr: begun.source_api.clone(), ..c.clone() };
    let outcome = super::migrate::follow(&source, &begun, false).map_err(|e| e.to_string())?;
    if outcome.result == "completed" {
        Ok(format!("{} ms", outcome.report.map_or(0, |r| r.total_ms)))
    } else {
        Err(format!("aborted: {}", outcome.reason.unwrap_or_default()))
    }
}

/// Runs the moves in order, `parallel` at a time.
fn carry_out<'a>(c: &Client, moves: &'a [RebalanceMoveView], parallel: usize, report: bool) -> Vec<(&'a RebalanceMoveView, MoveResult)> {
    let mut results = Vec::with_capacity(moves.len());
    for batch in moves.chunks(parallel) {
        let done: Vec<MoveResult> = std::thread::scope(|scope| {
            let handles: Vec<_> = batch.iter().map(|m| scope.spawn(move || one_move(c, m))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("the move's thread failed".into()))).collect()
        });
        for (m, r) in batch.iter().zip(done) {
            if report {
                match &r {
                    Ok(took) => println!("moved {} {} → {} ({took})", m.vm, m.from, m.to),
                    Err(why) => println!("did not move {} {} → {}: {why}", m.vm, m.from, m.to),
                }
            }
            results.push((m, r));
        }
    }
    results
}
