//! A checker for the `aggregate` transform (count and sum of `amount` per
//! key) under faults: given the inputs in each key's order and the records
//! of its output topic and of its `<name>-state` changelog, it proves that
//! no input was lost or counted twice by the state, and measures how many
//! outputs were repeated (at-least-once outputs).

use std::collections::BTreeMap;

/// Inputs per key, in the order the key's partition holds them.
#[derive(Debug, Default)]
pub struct Inputs {
    amounts: BTreeMap<String, Vec<i64>>,
}

impl Inputs {
    pub fn push(&mut self, key: &str, amount: i64) {
        self.amounts.entry(key.to_owned()).or_default().push(amount);
    }

    /// The inputs as a topic holds them (`topic consume --format json`):
    /// `{"amount": N}` values under their keys.
    pub fn from_records(records: &[serde_json::Value]) -> Inputs {
        let mut inputs = Inputs::default();
        for r in records {
            let value: serde_json::Value = serde_json::from_str(r["value"].as_str().unwrap()).unwrap();
            inputs.push(r["key"].as_str().unwrap(), value["amount"].as_i64().unwrap());
        }
        inputs
    }

    pub fn len(&self) -> usize {
        self.amounts.values().map(Vec::len).sum()
    }

    /// The totals after the first `n` inputs of `key`.
    fn totals(&self, key: &str, n: usize) -> (u64, i64) {
        (n as u64, self.amounts[key][..n].iter().sum())
    }

    /// Checks the output topic's records (`topic consume --format json`, in
    /// partition order): every output of a key is the key's totals after
    /// some prefix of its inputs; every prefix is emitted; the last output
    /// of each key is its whole total. Returns how many outputs repeat an
    /// earlier one (a step redone after a crash).
    pub fn check_outputs(&self, outputs: &[serde_json::Value]) -> Result<usize, String> {
        let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut last: BTreeMap<String, (u64, i64)> = BTreeMap::new();
        for r in outputs {
            let key = r["key"].as_str().ok_or_else(|| format!("an output without a key: {r}"))?.to_owned();
            let inputs = self.amounts.get(&key).ok_or_else(|| format!("an output for key {key} never input: {r}"))?;
            let totals = parse(&r["value"])?;
            if totals.0 == 0 || totals.0 as usize > inputs.len() {
                return Err(format!(
                    "key {key}: count {} but {} inputs (an input counted twice): {r}",
                    totals.0,
                    inputs.len()
                ));
            }
            let want = self.totals(&key, totals.0 as usize);
            if totals != want {
                return Err(format!("key {key}: output {totals:?}, the totals after {} inputs are {want:?}", totals.0));
            }
            seen.entry(key.clone()).or_default().push(totals.0);
            last.insert(key, totals);
        }
        let mut repeated = 0;
        for (key, inputs) in &self.amounts {
            let mut counts = seen.remove(key).unwrap_or_default();
            let emitted = counts.len();
            counts.sort_unstable();
            counts.dedup();
            repeated += emitted - counts.len();
            if counts != (1..=inputs.len() as u64).collect::<Vec<_>>() {
                let missing = (1..=inputs.len() as u64).filter(|c| counts.binary_search(c).is_err()).count();
                return Err(format!("key {key}: {missing} of its {} totals were never emitted", inputs.len()));
            }
            if last.get(key) != Some(&self.totals(key, inputs.len())) {
                return Err(format!("key {key}: its last output {:?} is not its total", last.get(key)));
            }
        }
        Ok(repeated)
    }

    /// Checks the changelog's records: the latest value of each key is its
    /// whole total, and nothing else is stored but the host's records.
    pub fn check_state(&self, changelog: &[serde_json::Value]) -> Result<(), String> {
        let mut latest: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        let mut progress = 0;
        for r in changelog {
            let key = r["key"].as_str().ok_or_else(|| format!("a changelog record without a key: {r}"))?;
            if key.starts_with('\0') {
                progress += 1;
                continue;
            }
            latest.insert(key.to_owned(), r["value"].clone());
        }
        if progress == 0 {
            return Err("no progress record in the changelog".into());
        }
        for (key, inputs) in &self.amounts {
            let stored = latest.remove(key).ok_or_else(|| format!("key {key} is not in the changelog"))?;
            let totals = parse(&stored)?;
            if totals != self.totals(key, inputs.len()) {
                return Err(format!(
                    "key {key}: the changelog holds {totals:?}, its total is {:?}",
                    self.totals(key, inputs.len())
                ));
            }
        }
        match latest.keys().next() {
            Some(extra) => Err(format!("the changelog holds key {extra}, never input")),
            None => Ok(()),
        }
    }
}

fn parse(value: &serde_json::Value) -> Result<(u64, i64), String> {
    let text = value.as_str().ok_or_else(|| format!("totals are not text: {value}"))?;
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("totals {text}: {e}"))?;
    match (v["count"].as_u64(), v["sum"].as_i64()) {
        (Some(c), Some(s)) => Ok((c, s)),
        _ => Err(format!("totals {text} lack an integer count and sum")),
    }
}
