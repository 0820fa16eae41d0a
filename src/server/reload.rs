//! A reload, start to swap: read, parse and validate the config (the same
//! code as `portcullis check`), build the whole new snapshot and bind the
//! new addresses; only then swap, so a failure keeps everything as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tracing::{error, info};

use super::bind::{bind_socket, v4_any_ports, BindKey};
use super::running::Running;
use super::snapshot::{build, listener_ctx, notifier};
use super::BuildError;
use crate::config::{diff, Config};
use crate::ops::{reload, systemd};
use crate::proxy::context::ListenerCtx;
use crate::tls::hosts::HostTable;

/// Each listener's new settings, by name.
type Contexts = BTreeMap<String, Arc<ListenerCtx>>;

/// Sockets bound for addresses new in a reload, with their listener's name.
type Fresh = Vec<(BindKey, String, TcpListener)>;

impl Running {
    pub(super) async fn reload(&mut self, request: reload::Request) {
        systemd::reloading();
        let result = self.try_reload();
        systemd::ready(match &result {
            Ok(_) => "serving; configuration reloaded",
            Err(_) => "serving the previous configuration: the reload failed",
        });
        self.metrics.reload(result.is_ok());
        match &result {
            Ok(changes) => info!(
                trigger = request.reason,
                changes = %changes,
                "configuration reloaded"
            ),
            Err(e) => {
                self.reload_failures += 1;
                error!(
                    trigger = request.reason,
                    error = %e,
                    reload_failures = self.reload_failures,
                    "reload failed; still serving the previous configuration"
                );
            }
        }
        reload::answer(request.reply, result);
    }

    /// Read, parse, validate, build, bind what is new; only then swap.
    fn try_reload(&mut self) -> Result<diff::Changes, String> {
        let Some(path) = self.config_file.clone() else {
            return Err("this server was not started from a config file".into());
        };
        let mut config = Config::load(&path).map_err(|e| e.to_string())?;
        // Watch the new files even if this reload fails: the operator may
        // be about to copy in the certificate it could not find.
        if let Some(w) = self.watcher.as_mut() {
            let mut files = diff::watched_files(&path, &self.config);
            files.extend(diff::watched_files(&path, &config));
            w.watch(&files);
        }
        let changes = diff::diff(&self.config, &config);
        // Read only at start: reported as needing a restart, not applied
        // (a new state_dir would split certificates from their ACME task).
        config.state_dir = self.config.state_dir.clone();
        config.max_connections = self.config.max_connections;
        config.log = self.config.log.clone();
        config.admin = self.config.admin.clone();
        config.store = self.config.store.clone();
        let lines = |es: Vec<BuildError>| {
            es.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        let snapshot = build(&config, &self.tls, &self.slots).map_err(lines)?;
        let table = Arc::new(snapshot.table);
        let notifier = if config.notify != self.config.notify {
            Some(
                notifier(
                    &config,
                    self.config_file.as_deref(),
                    self.notifier.load().as_deref(),
                )
                .map_err(|e| BuildError::Notify(e).to_string())?,
            )
        } else {
            None
        };

        let (contexts, fresh) = self.listener_contexts(&config, &table)?;

        // Everything is built: swap.
        let mut changes = changes;
        for s in &snapshot.slots {
            let before = self
                .slots
                .iter()
                .find(|o| o.names == s.names && o.second == s.second);
            if before.is_some_and(|o| o.slot.key().cert != s.slot.key().cert) {
                changes.certificates_replaced.push(diff::host_key(&s.names));
            }
        }
        self.table.store(table);
        if let Some(n) = notifier {
            self.notifier.store(n);
        }
        self.retire_removed(&config);
        self.hand_over(&config, &contexts);
        for (key, name, socket) in fresh {
            let ctx = match contexts.get(&name) {
                Some(c) => Arc::new(ArcSwap::new(c.clone())),
                None => continue, // built above for every listener
            };
            self.start_accepting(key, name, ctx, socket, None);
        }
        self.config = config;
        self.slots = snapshot.slots;
        self.sync_acme(snapshot.new_acme);
        self.publish_views();
        self.publish_topology();
        if let (Some(w), Some(path)) = (self.watcher.as_mut(), &self.config_file) {
            w.watch(&diff::watched_files(path, &self.config));
        }
        Ok(changes)
    }

    /// Settings for every listener of `config`, and sockets for the
    /// addresses not bound yet.
    fn listener_contexts(
        &self,
        config: &Config,
        table: &Arc<HostTable>,
    ) -> Result<(Contexts, Fresh), String> {
        let v4_any = v4_any_ports(config.listeners.values());
        let mut contexts = BTreeMap::new();
        let mut fresh = Vec::new();
        for l in config.listeners.values() {
            let mut ctx = listener_ctx(
                config,
                l,
                &self.tls,
                table,
                &self.challenges,
                &self.metrics,
                &self.runtime,
            )
            .map_err(|e| e.to_string())?;
            // Open connections go on counting against the limiter they
            // were admitted by: the listener keeps it across the reload.
            if let Some(b) = self.bound.values().find(|b| b.listener == l.name) {
                ctx.limiter = b.ctx.load().limiter.clone();
            }
            contexts.insert(l.name.clone(), Arc::new(ctx));
            for addr in &l.bind {
                let key = BindKey::new(&l.name, *addr);
                if !self.bound.contains_key(&key) {
                    let socket = bind_socket(*addr, &v4_any).map_err(|source| {
                        BuildError::Bind {
                            listener: l.name.clone(),
                            addr: *addr,
                            source,
                        }
                        .to_string()
                    })?;
                    fresh.push((key, l.name.clone(), socket));
                }
            }
        }
        Ok((contexts, fresh))
    }

    /// Stops accepting on addresses gone from `config`; their sessions
    /// drain for the grace period.
    fn retire_removed(&mut self, config: &Config) {
        let keys: BTreeSet<BindKey> = config
            .listeners
            .values()
            .flat_map(|l| l.bind.iter().map(|a| BindKey::new(&l.name, *a)))
            .collect();
        let grace = config.timeouts.shutdown_grace;
        self.bound.retain(|key, b| {
            if keys.contains(key) {
                return true;
            }
            if let Some(a) = b.local {
                self.metrics.forget_address(&b.listener, a);
            }
            let addr = b.local.map(|a| a.to_string()).unwrap_or_default();
            info!(listener = %b.listener, addr = %addr, "address removed: no new connections there, open sessions drain");
            b.listen.cancel();
            let relays = b.relays.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                relays.cancel();
            });
            false
        });
    }

    /// Addresses kept: the new settings, and to their new listener if they
    /// moved.
    fn hand_over(&mut self, config: &Config, contexts: &Contexts) {
        for l in config.listeners.values() {
            for addr in &l.bind {
                if let Some(b) = self.bound.get_mut(&BindKey::new(&l.name, *addr)) {
                    if let Some(ctx) = contexts.get(&l.name) {
                        b.ctx.store(ctx.clone());
                        if b.listener != l.name {
                            // The address moved to another listener: its
                            // health and metrics go with it.
                            if let Some(a) = b.local {
                                self.metrics.forget_address(&b.listener, a);
                                self.metrics.accepting(&l.name, a, true);
                            }
                            b.listener = l.name.clone();
                        }
                    }
                }
            }
        }
    }
}
