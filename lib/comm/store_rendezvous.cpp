#include "lib/comm/store_rendezvous.h"

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <netdb.h>

#include <cstdlib>
#include <thread>

#include "lib/core/error.h"

namespace qt {
namespace {

std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

std::vector<uint8_t> bytes(const std::string& s) { return {s.begin(), s.end()}; }

// c10d's errors without c10's C++ backtrace: what() appends 20-odd lines of frames to the one error line.
// (Its closing period dropped: our text goes on after it.)
std::string message_of(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  std::string m = c10_error ? c10_error->what_without_backtrace() : e.what();
  while (!m.empty() && (m.back() == '.' || m.back() == '\n' || m.back() == ' ')) m.pop_back();
  return m;
}

// " (MASTER_ADDR 'x' does not resolve: ...)" when the host name does not resolve now, else "": c10d only says that
// connecting timed out. (Not checked before connecting: a host's DNS record may appear after its workers start.)
std::string resolve_failure(const std::string& host) {
  addrinfo* found = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), nullptr, nullptr, &found);
  if (rc == 0) {
    ::freeaddrinfo(found);
    return "";
  }
  return " (MASTER_ADDR '" + host + "' does not resolve: " + ::gai_strerror(rc) + ")";
}

}  // namespace

struct StoreRendezvous::Impl {
  LaunchEnv env;
  std::chrono::milliseconds timeout;
  std::string prefix;
  bool server = false;
  c10::intrusive_ptr<c10d::TCPStore> store;

  std::string where() const {
    return "rank " + std::to_string(env.rank) + ": TCPStore at " + env.master_addr + ":" +
           std::to_string(env.master_port);
  }
};

StoreRendezvous::StoreRendezvous(const LaunchEnv& env, std::chrono::milliseconds timeout)
    : impl_(std::make_unique<Impl>()) {
  impl_->env = env;
  impl_->timeout = timeout;
  impl_->prefix = "qlora-train/" + env_or("TORCHELASTIC_RUN_ID", "none") + "/" +
                  env_or("TORCHELASTIC_RESTART_COUNT", "0") + "/";
  impl_->server = env.rank == 0 && env_or("TORCHELASTIC_USE_AGENT_STORE", "False") != "True";
  if (env.master_port <= 0 || env.master_port > 65535)
    fail(ErrorKind::Usage, impl_->where() + ": MASTER_PORT must be in 1..65535");
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<std::uint16_t>(env.master_port);
  opts.isServer = impl_->server;
  opts.waitWorkers = false;  // broadcast() keeps the server up until every rank has read what it needs
  opts.multiTenant = impl_->server;
  opts.timeout = timeout;
  try {
    impl_->store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, opts);
  } catch (const std::exception& e) {
    fail(ErrorKind::Device,
         impl_->where() + ": cannot " + (impl_->server ? "serve" : "connect") + ": " + message_of(e) +
             resolve_failure(env.master_addr) +
             (impl_->server ? "" : "; is rank 0 (or torchrun's agent) running at MASTER_ADDR:MASTER_PORT?"));
  }
}

StoreRendezvous::~StoreRendezvous() = default;

const std::string& StoreRendezvous::key_prefix() const { return impl_->prefix; }
bool StoreRendezvous::serves_store() const { return impl_->server; }

void StoreRendezvous::set(const std::string& key, const std::string& value) {
  try {
    impl_->store->set(impl_->prefix + key, bytes(value));
  } catch (const std::exception& e) {
    fail(ErrorKind::Device, impl_->where() + ": set '" + impl_->prefix + key + "': " + message_of(e));
  }
}

std::string StoreRendezvous::get(const std::string& key) {
  const std::string full = impl_->prefix + key;
  try {
    impl_->store->wait({full}, impl_->timeout);
    std::vector<uint8_t> v = impl_->store->get(full);
    return {v.begin(), v.end()};
  } catch (const std::exception& e) {
    fail(ErrorKind::Device, impl_->where() + ": waiting for key '" + full + "' (written by rank 0) failed after " +
                                std::to_string(impl_->timeout.count()) + " ms; did rank 0 start? " + message_of(e));
  }
}

int64_t StoreRendezvous::add(const std::string& key, int64_t delta) {
  try {
    return impl_->store->add(impl_->prefix + key, delta);
  } catch (const std::exception& e) {
    fail(ErrorKind::Device, impl_->where() + ": add '" + impl_->prefix + key + "': " + message_of(e));
  }
}

std::string StoreRendezvous::broadcast(const std::string& key, const std::string& value) {
  const std::string read_count = key + "/read";
  if (impl_->env.rank == 0) {
    set(key, value);
    if (!impl_->server) return value;
    const auto deadline = std::chrono::steady_clock::now() + impl_->timeout;
    int64_t n = 0;
    while ((n = add(read_count, 0)) < impl_->env.world_size - 1) {
      if (std::chrono::steady_clock::now() > deadline)
        fail(ErrorKind::Device, impl_->where() + ": only " + std::to_string(n) + " of " +
                                    std::to_string(impl_->env.world_size - 1) + " ranks read key '" +
                                    impl_->prefix + key + "' in time (" + std::to_string(impl_->timeout.count()) +
                                    " ms); did all " + std::to_string(impl_->env.world_size) +
                                    " ranks (WORLD_SIZE) start?");
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return value;
  }
  std::string v = get(key);
  add(read_count, 1);
  return v;
}

}  // namespace qt
