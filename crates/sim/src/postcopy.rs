//! The simulated post-copy: at the switch the guest's memory is split between its two hosts —
//! the destination runs it, the source holds the pages it has not sent yet — until the source
//! has sent the last one. Losing the source (its power, its copy, the link) in between loses
//! the guest: its copy at the destination crashes, as a real guest stalls on a missing page and
//! the QEMU driver kills it. The source's copy is spent from the switch on: the simulated
//! hypervisor refuses to resume it, as the QEMU driver does, and the oracle would see a resume
//! as stale (it holds no whole image).

use crate::world::{lock, World};

/// How long the source sends the pages left after the switch (virtual time).
pub const SIM_POSTCOPY_PAGES_MS: u64 = 200;

/// A post-copy migration's pages still at its source.
#[derive(Clone, Debug)]
pub struct PagesAtSource {
    pub source: u32,
    pub dest: u32,
    /// The destination's generation: the copy that needs the pages.
    pub generation: u64,
    /// Virtual time of sending still needed.
    pub left_ms: u64,
    /// Why the pages can no longer come, once they cannot.
    pub lost: Option<String>,
}

/// The switch: the source's copy stops for good, the destination's paused copy receives the
/// device state and the memory as of now (resumable once the switchover commits), and the pages
/// it lacks stay at the source.
pub fn switch(w: &World, name: &str, source: u32, dest: u32, generation: u64) {
    if let Some(hosts) = lock(&w.running).get_mut(name) {
        hosts.remove(&source);
    }
    let mut images = lock(&w.images);
    let img = images.entry(name.to_string()).or_default();
    let runs = img.runs;
    img.paused.insert((dest, generation), runs);
    img.pages_at_source = Some(PagesAtSource { source, dest, generation, left_ms: SIM_POSTCOPY_PAGES_MS, lost: None });
}

/// Where sending a post-copy migration's pages stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    More,
    /// The last page went.
    Done,
    /// Nobody waits for them any more (the VM started afresh somewhere, or they were lost).
    Gone,
}

/// Sends `ms` of pages of `name` from `source`.
pub fn send(w: &World, name: &str, source: u32, ms: u64) -> Sent {
    let mut images = lock(&w.images);
    let Some(img) = images.get_mut(name) else { return Sent::Gone };
    let Some(p) = img.pages_at_source.as_mut().filter(|p| p.source == source && p.lost.is_none()) else {
        return Sent::Gone;
    };
    p.left_ms = p.left_ms.saturating_sub(ms);
    if p.left_ms > 0 {
        return Sent::More;
    }
    img.pages_at_source = None;
    Sent::Done
}

/// The VM started afresh (from its disk): no copy waits for pages any more.
pub fn started_afresh(w: &World, name: &str) {
    if let Some(img) = lock(&w.images).get_mut(name) {
        img.pages_at_source = None;
    }
}

/// The pages of `name` at `source` can no longer be sent.
pub fn lose(w: &World, name: &str, source: u32, why: &str) {
    if let Some(p) = lock(&w.images).get_mut(name).and_then(|i| i.pages_at_source.as_mut()).filter(|p| p.source == source && p.lost.is_none()) {
        p.lost = Some(why.to_string());
    }
}

/// Why the copy of `name` at `host` (generation `generation`) can never be whole, if it cannot:
/// it waits for pages that were lost, or whose source has no power.
pub fn missing_pages(w: &World, name: &str, host: u32, generation: u64) -> Option<String> {
    let images = lock(&w.images);
    let p = images.get(name)?.pages_at_source.as_ref().filter(|p| p.dest == host && p.generation == generation)?;
    if let Some(why) = &p.lost {
        return Some(why.clone());
    }
    lock(&w.cond).down.contains(&p.source).then(|| format!("its source, host {}, lost power", p.source))
}
