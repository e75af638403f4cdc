#pragma once
// Small values shared between ranks launched by torchrun, through LibTorch's c10d TCPStore at
// MASTER_ADDR:MASTER_PORT. torchrun's agent serves that store itself (TORCHELASTIC_USE_AGENT_STORE=True, the
// default of both its static and c10d rendezvous), and every rank connects as a client; otherwise (the agent
// store disabled, or RANK/WORLD_SIZE set by hand) rank 0 serves it, as torch.distributed's env:// does.
// Keys live under "qlora-train/<TORCHELASTIC_RUN_ID>/<TORCHELASTIC_RESTART_COUNT>/": torchrun's own keys are
// under its run id without our prefix, and a restarted worker group never reads the keys of an earlier attempt.
// The c10d headers stay in the .cpp (pimpl).
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "lib/comm/launch_env.h"

namespace qt {

class StoreRendezvous {
 public:
  // Connects (or, see above, serves). Throws qt::Error(Device) naming the address when that fails in `timeout`.
  StoreRendezvous(const LaunchEnv& env, std::chrono::milliseconds timeout);
  ~StoreRendezvous();
  StoreRendezvous(const StoreRendezvous&) = delete;
  StoreRendezvous& operator=(const StoreRendezvous&) = delete;

  void set(const std::string& key, const std::string& value);
  // Waits for the key up to the timeout; throws qt::Error(Device) naming the rank and the key.
  std::string get(const std::string& key);
  // Atomically adds `delta` to the integer at `key` (0 when absent) and returns the new value.
  int64_t add(const std::string& key, int64_t delta);
  // Rank 0's `value` on every rank (others' `value` is ignored). When this rank serves the store (rank 0 with
  // no agent store) it also waits until every rank has read the key, so that it does not close the store early.
  std::string broadcast(const std::string& key, const std::string& value);

  const std::string& key_prefix() const;
  bool serves_store() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qt
