//! The filter chain and the `on_error` policy: the one place that runs a
//! stage's filters in order and decides what a failed call does to the
//! events it was given.
//!
//! Ingest and the destination stages run their filters through [`run`],
//! each saying through a [`Site`] how its items look to a plugin, how a
//! verdict applies to them, and where dead letters go. A state merge is one
//! call, not a chain; its failure goes through the same [`on_failure`].

use std::future::Future;
use std::sync::Arc;

use super::{Decision, OnError, OutputRules, PluginHandle, WitEvent};

/// What a stage tells the chain about its items of type `T`.
pub trait Site<T> {
    /// The error of the stage's dead-letter write, which stops the chain.
    type Error;

    /// The item as the plugin sees it.
    fn wit(&self, item: &T) -> WitEvent;

    /// Applies `filter`'s decisions (one per item, checked by the plugin
    /// host against the stage's rules) to the items of the call.
    fn apply(&mut self, filter: &PluginHandle, items: Vec<T>, decisions: Vec<Decision>) -> Vec<T>;

    /// `filter` failed on `items` and its `on_error` is `policy`: told
    /// before the items go on, are dropped or are dead-lettered.
    fn failed(&mut self, filter: &PluginHandle, items: &[T], policy: OnError, reason: &str) {
        let _ = (filter, items, policy, reason);
    }

    /// Stores the items of a failed call in the dead letters, with `reason`.
    fn dead_letter(&mut self, items: Vec<T>, reason: String) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Runs `filters` in order over `items`, each on what the previous one
/// left, with `rules` bounding what a call may return. `context` prefixes
/// a failure's reason (`"destination aws: "`), naming where it ran.
pub async fn run<T, S: Site<T>>(
    filters: &[PluginHandle],
    rules: &Arc<dyn OutputRules>,
    context: &str,
    mut items: Vec<T>,
    site: &mut S,
) -> Result<Vec<T>, S::Error> {
    for filter in filters {
        if items.is_empty() {
            break;
        }
        let wit = items.iter().map(|i| site.wit(i)).collect();
        match filter.filter(wit, rules.clone()).await {
            Ok(decisions) => items = site.apply(filter, items, decisions),
            Err(error) => {
                let reason = format!("{context}plugin {}: {error}", filter.name());
                site.failed(filter, &items, filter.on_error(), &reason);
                items = on_failure(filter, items, reason, |items, reason| site.dead_letter(items, reason)).await?;
            }
        }
    }
    Ok(items)
}

/// Applies `plugin`'s `on_error` to what its failed call was given: the
/// items back, to go on as if the plugin had kept them (`pass`), or none
/// (`drop`; `dead-letter` once `dead_letter` has stored them). Logs one
/// line naming the plugin, the policy and the reason.
pub async fn on_failure<T, E, F, Fut>(
    plugin: &PluginHandle,
    items: Vec<T>,
    reason: String,
    dead_letter: F,
) -> Result<Vec<T>, E>
where
    F: FnOnce(Vec<T>, String) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let policy = plugin.on_error();
    tracing::warn!(plugin = plugin.name(), items = items.len(), on_error = policy.as_str(), %reason, "plugin failed");
    match policy {
        OnError::Pass => Ok(items),
        OnError::Drop => Ok(Vec::new()),
        OnError::DeadLetter => dead_letter(items, reason).await.map(|()| Vec::new()),
    }
}
