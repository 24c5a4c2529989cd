//! The session map: which connections are members of which session, and the user map:
//! which connections each user holds.
//!
//! Both are sharded under `parking_lot` locks so that connections joining different
//! sessions rarely meet. A session's member list is an `Arc<Vec<_>>` replaced
//! copy-on-write: a forwarding worker clones the `Arc` under a read lock and releases
//! the lock before it offers a single frame, so no send ever happens under a lock.
//!
//! Lock order: a connection's own membership lock, then a shard lock. Code that
//! touches several shards takes them one at a time.

use crate::cluster::{Interest, Watch};
use crate::connection::{ConnectionId, ConnectionState};
use parking_lot::RwLock;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

/// Shards per map. A power of two well above the core count keeps contention low.
pub(crate) const SHARDS: usize = 64;

/// The members of one session, shared with the workers forwarding to it.
pub(crate) type Members = Arc<Vec<Arc<ConnectionState>>>;

/// A snapshot of one session, as [`crate::Broker::session`] returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// The session's id.
    pub id: Arc<str>,
    /// Its members when the snapshot was taken.
    pub members: Vec<SessionMember>,
    /// When its first member joined.
    pub created: SystemTime,
}

/// One member of a [`Session`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionMember {
    /// The member connection.
    pub connection: ConnectionId,
    /// The user that connection acts as.
    pub user: Arc<str>,
}

struct SessionEntry {
    id: Arc<str>,
    created: SystemTime,
    members: Members,
}

/// Hashes with fixed keys: a shard or worker index only spreads load, and must be the
/// same for an id every time.
fn fixed_hash(value: impl Hash) -> usize {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value) as usize
}

/// The shard an id lives in.
fn shard_of(id: &str) -> usize {
    fixed_hash(id) % SHARDS
}

/// Picks one of `n` forwarding workers for a target id, so that every message to one
/// session (or user) goes through the same worker and keeps its order.
pub(crate) fn worker_of(id: &str, n: usize) -> usize {
    fixed_hash((id, 0x5eed_u16)) % n
}

/// A map split into [`SHARDS`] maps, each under its own lock.
struct Sharded<K, V> {
    shards: Box<[RwLock<HashMap<K, V>>]>,
}

impl<K, V> Sharded<K, V> {
    fn new() -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }
}

impl<K, V> std::ops::Index<usize> for Sharded<K, V> {
    type Output = RwLock<HashMap<K, V>>;

    fn index(&self, shard: usize) -> &Self::Output {
        &self.shards[shard]
    }
}

pub(crate) struct SessionMap {
    shards: Sharded<Arc<str>, SessionEntry>,
    count: AtomicUsize,
    /// Told when a session gets its first member or loses its last (in a cluster).
    watch: Option<Watch>,
}

/// Why a connection could not join a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JoinError {
    /// The connection is at its limit of sessions.
    TooMany,
    /// The connection is closing.
    Gone,
}

impl SessionMap {
    pub(crate) fn new(watch: Option<Watch>) -> SessionMap {
        SessionMap {
            shards: Sharded::new(),
            count: AtomicUsize::new(0),
            watch,
        }
    }

    fn changed(&self, session: &Arc<str>) {
        if let Some(watch) = &self.watch {
            watch.changed(Interest::Session(session.clone()));
        }
    }

    /// The ids of every session with members now.
    pub(crate) fn ids(&self) -> Vec<Arc<str>> {
        let mut ids = Vec::with_capacity(self.len());
        for shard in self.shards.shards.iter() {
            ids.extend(shard.read().keys().cloned());
        }
        ids
    }

    /// Sessions that have at least one member.
    pub(crate) fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// The session's id and its members now, for forwarding.
    pub(crate) fn members(&self, session: &str) -> Option<(Arc<str>, Members)> {
        let shard = self.shards[shard_of(session)].read();
        shard
            .get(session)
            .map(|entry| (entry.id.clone(), entry.members.clone()))
    }

    /// A snapshot for the host.
    pub(crate) fn snapshot(&self, session: &str) -> Option<Session> {
        let shard = self.shards[shard_of(session)].read();
        shard.get(session).map(|entry| Session {
            id: entry.id.clone(),
            created: entry.created,
            members: entry
                .members
                .iter()
                .map(|c| SessionMember {
                    connection: c.id,
                    user: c.user.clone(),
                })
                .collect(),
        })
    }

    /// Adds `conn` to `session`, creating the session at its first member. Returns
    /// false when it was a member already.
    pub(crate) fn join(
        &self,
        conn: &Arc<ConnectionState>,
        session: &str,
        max_sessions: usize,
    ) -> Result<bool, JoinError> {
        let mut memberships = conn.memberships.lock();
        if memberships.gone {
            return Err(JoinError::Gone);
        }
        if memberships.sessions.contains(session) {
            return Ok(false);
        }
        if memberships.sessions.len() >= max_sessions {
            return Err(JoinError::TooMany);
        }

        let mut shard = self.shards[shard_of(session)].write();
        let mut created = false;
        let entry = match shard.get_mut(session) {
            Some(entry) => entry,
            None => {
                let id: Arc<str> = Arc::from(session);
                self.count.fetch_add(1, Ordering::Relaxed);
                created = true;
                shard.entry(id.clone()).or_insert(SessionEntry {
                    id,
                    created: SystemTime::now(),
                    members: Arc::new(Vec::new()),
                })
            }
        };
        Arc::make_mut(&mut entry.members).push(conn.clone());
        let id = entry.id.clone();
        memberships.sessions.insert(id.clone());
        drop(shard);
        drop(memberships);
        if created {
            self.changed(&id);
        }
        Ok(true)
    }

    /// Removes `conn` from `session`; frees the session when it was the last member.
    /// Returns false when it was not a member.
    pub(crate) fn leave(&self, conn: &ConnectionState, session: &str) -> bool {
        let mut memberships = conn.memberships.lock();
        if !memberships.sessions.remove(session) {
            return false;
        }
        self.remove_member(conn.id, session);
        true
    }

    /// Removes `conn` from every session and marks it gone, so that no later join can
    /// add it again. Returns how many sessions it left.
    pub(crate) fn leave_all(&self, conn: &ConnectionState) -> usize {
        let sessions = {
            let mut memberships = conn.memberships.lock();
            memberships.gone = true;
            std::mem::take(&mut memberships.sessions)
        };
        for session in sessions.iter() {
            self.remove_member(conn.id, session);
        }
        sessions.len()
    }

    /// Removes a session whole; returns its members, who are no longer in it.
    pub(crate) fn close(&self, session: &str) -> Option<(Arc<str>, Members)> {
        let entry = self.shards[shard_of(session)].write().remove(session)?;
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.changed(&entry.id);
        for member in entry.members.iter() {
            // Only the membership in the entry just removed: the member may already have
            // left it and joined a new session of the same name.
            let mut memberships = member.memberships.lock();
            if memberships
                .sessions
                .get(session)
                .is_some_and(|id| Arc::ptr_eq(id, &entry.id))
            {
                memberships.sessions.remove(session);
            }
        }
        Some((entry.id, entry.members))
    }

    fn remove_member(&self, conn: ConnectionId, session: &str) {
        let mut shard = self.shards[shard_of(session)].write();
        let Some(entry) = shard.get_mut(session) else {
            return;
        };
        if entry.members.len() == 1 && entry.members[0].id == conn {
            let id = entry.id.clone();
            shard.remove(session);
            self.count.fetch_sub(1, Ordering::Relaxed);
            drop(shard);
            self.changed(&id);
            return;
        }
        let members = Arc::make_mut(&mut entry.members);
        if let Some(i) = members.iter().position(|m| m.id == conn) {
            members.swap_remove(i);
        }
    }
}

/// Every live connection, by id and by user.
pub(crate) struct Registry {
    by_user: Sharded<Arc<str>, Vec<Arc<ConnectionState>>>,
    by_id: Sharded<ConnectionId, Arc<ConnectionState>>,
    users: AtomicUsize,
    /// Registered connections.
    connections: AtomicUsize,
    /// Registered connections plus handshakes in progress.
    places: AtomicUsize,
    /// Told when a user gets a first connection or loses the last (in a cluster).
    watch: Option<Watch>,
}

/// A place among `max_connections`, held by a handshake in progress; given back when
/// dropped unless the connection was registered in it.
pub(crate) struct Place<'a>(&'a Registry);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.places.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Registry {
    pub(crate) fn new(watch: Option<Watch>) -> Registry {
        Registry {
            by_user: Sharded::new(),
            by_id: Sharded::new(),
            users: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            places: AtomicUsize::new(0),
            watch,
        }
    }

    fn changed(&self, user: &Arc<str>) {
        if let Some(watch) = &self.watch {
            watch.changed(Interest::User(user.clone()));
        }
    }

    /// The ids of every user with live connections now.
    pub(crate) fn user_ids(&self) -> Vec<Arc<str>> {
        let mut ids = Vec::with_capacity(self.users());
        for shard in self.by_user.shards.iter() {
            ids.extend(shard.read().keys().cloned());
        }
        ids
    }

    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn users(&self) -> usize {
        self.users.load(Ordering::Relaxed)
    }

    /// Adds a connection unless that would pass `max`. Returns the user's other
    /// connections that were there before it.
    /// Takes a place for a connection about to start its handshake, unless `max`
    /// places are taken: peers still in their handshake count against the limit too.
    pub(crate) fn reserve(&self, max: usize) -> Option<Place<'_>> {
        self.places
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Place(self))
    }

    /// Registers a connection in the place it reserved. Returns the user's other
    /// connections that were there before it.
    pub(crate) fn insert(
        &self,
        conn: &Arc<ConnectionState>,
        place: Place<'_>,
    ) -> Vec<Arc<ConnectionState>> {
        // The place now belongs to the connection; `remove` gives it back.
        std::mem::forget(place);
        self.connections.fetch_add(1, Ordering::AcqRel);
        self.by_id[id_shard(conn.id)]
            .write()
            .insert(conn.id, conn.clone());

        let mut shard = self.by_user[shard_of(&conn.user)].write();
        let list = shard.entry(conn.user.clone()).or_default();
        let first = list.is_empty();
        if first {
            self.users.fetch_add(1, Ordering::Relaxed);
        }
        let others = list.clone();
        list.push(conn.clone());
        drop(shard);
        if first {
            self.changed(&conn.user);
        }
        others
    }

    pub(crate) fn remove(&self, conn: &ConnectionState) {
        if self.by_id[id_shard(conn.id)]
            .write()
            .remove(&conn.id)
            .is_none()
        {
            return;
        }
        self.connections.fetch_sub(1, Ordering::AcqRel);
        self.places.fetch_sub(1, Ordering::AcqRel);

        let mut shard = self.by_user[shard_of(&conn.user)].write();
        if let Some(list) = shard.get_mut(&*conn.user) {
            list.retain(|c| c.id != conn.id);
            if list.is_empty() {
                shard.remove(&*conn.user);
                self.users.fetch_sub(1, Ordering::Relaxed);
                drop(shard);
                self.changed(&conn.user);
            }
        }
    }

    /// The user's live connections now.
    pub(crate) fn of_user(&self, user: &str) -> Vec<Arc<ConnectionState>> {
        self.by_user[shard_of(user)]
            .read()
            .get(user)
            .cloned()
            .unwrap_or_default()
    }

    pub(crate) fn get(&self, id: ConnectionId) -> Option<Arc<ConnectionState>> {
        self.by_id[id_shard(id)].read().get(&id).cloned()
    }

    /// Appends the live connections of one shard (of [`SHARDS`]) to `into`.
    pub(crate) fn connections_in(&self, shard: usize, into: &mut Vec<Arc<ConnectionState>>) {
        into.extend(self.by_id[shard].read().values().cloned());
    }
}

fn id_shard(id: ConnectionId) -> usize {
    (id.0 as usize) % SHARDS
}
