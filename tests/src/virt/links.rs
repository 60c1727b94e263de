//! The links: delivery in order with delay, stalls under a cut, keep-alives
//! and the idle timeout, as QUIC presents them to the session.

use super::*;

impl World {
    pub(super) fn deliver(&mut self, c: u64, dir: usize) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let i = conn.agent;
        let receiver_open = if dir == UP {
            conn.coord_open
        } else {
            conn.agent_open
        };
        if !receiver_open {
            conn.queue[dir].clear();
            conn.pumping[dir] = false;
            return;
        }
        if self.agents[i].cut_until[dir] > self.now {
            // Stalled: the transport retransmits.
            self.at(self.now + RETRANSMIT_MS, Ev::Deliver(c, dir));
            return;
        }
        let now = self.now;
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let Some((ready, _)) = conn.queue[dir].front() else {
            conn.pumping[dir] = false;
            return;
        };
        if *ready > now {
            let t = *ready;
            self.at(t, Ev::Deliver(c, dir));
            return;
        }
        let Some((_, msg)) = conn.queue[dir].pop_front() else {
            return;
        };
        conn.heard[dir] = now;
        match conn.queue[dir].front() {
            Some((t, _)) => {
                let t = *t;
                self.at(t, Ev::Deliver(c, dir));
            }
            None => conn.pumping[dir] = false,
        }
        match msg {
            Msg::Up(m) => {
                // The coordinator's QUIC stack acknowledges what arrived:
                // the agent hears it (at once, here) if the way back is open.
                if !self.cut(i, DOWN) && self.agents[i].conn == Some(c) {
                    self.node_call(i, |n, r| n.handle_heard(r));
                }
                self.deliver_up(c, i, m)
            }
            Msg::Down(m) => {
                if let CoordMsg::RunNow { task_id, at } = &m {
                    self.agents[i].run_now.insert((*task_id, *at));
                }
                if self.agents[i].conn == Some(c) {
                    self.node_call(i, |n, r| n.handle_message(r, m));
                }
            }
        }
    }

    pub(super) fn deliver_up(&mut self, c: u64, _i: usize, m: AgentMsg) {
        let Some((k, inc, nc)) = self.conns.get(&c).and_then(|k| k.node_conn) else {
            return;
        };
        if inc == self.coords[k].inc {
            self.coord_call(k, |n, now| n.handle_agent_msg(now, nc, m));
        }
    }

    pub(super) fn keep_alive(&mut self, c: u64) {
        let now = self.now;
        let Some(conn) = self.conns.get(&c) else {
            return;
        };
        let i = conn.agent;
        let (agent_open, coord_open) = (conn.agent_open, conn.coord_open);
        let up_ok = agent_open && !self.cut(i, UP);
        let down_ok = coord_open && !self.cut(i, DOWN);
        if let Some(conn) = self.conns.get_mut(&c) {
            if up_ok {
                conn.heard[UP] = now;
            }
            if down_ok {
                conn.heard[DOWN] = now;
            }
        }
        if down_ok && agent_open && self.agents[i].conn == Some(c) {
            self.node_call(i, |n, r| n.handle_heard(r));
        }
        let Some(conn) = self.conns.get(&c) else {
            return;
        };
        let (heard, keep_ms, idle_ms) = (conn.heard, conn.keep_ms, conn.idle_ms);
        if conn.agent_open && now - heard[DOWN] > idle_ms {
            if self.agents[i].conn == Some(c) {
                self.agents[i].conn = None;
                self.agents[i].dial += 1;
                self.node_call(i, |n, r| n.handle_closed(r, Closed::Lost));
            }
            self.close_agent_side(c, true);
        }
        if self.conns.get(&c).is_some_and(|k| k.coord_open) && now - heard[UP] > idle_ms {
            self.close_coord_side(c, true, Closed::Lost);
        }
        if self.conns.contains_key(&c) {
            self.at(now + keep_ms, Ev::KeepAlive(c));
        }
    }
}
