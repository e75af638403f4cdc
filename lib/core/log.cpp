#include "lib/core/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "lib/core/error.h"

namespace qt::log {
namespace {

// Logs go to stderr so that stdout carries only machine-readable results (eval's JSON line).
std::shared_ptr<spdlog::logger> logger() {
  static std::shared_ptr<spdlog::logger> instance = [] {
    auto l = spdlog::stderr_color_mt("qlora-train");
    l->set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
    l->set_level(spdlog::level::info);
    return l;
  }();
  return instance;
}

}  // namespace

void set_level(Level level) {
  static const spdlog::level::level_enum map[] = {spdlog::level::debug, spdlog::level::info, spdlog::level::warn,
                                                  spdlog::level::err, spdlog::level::off};
  logger()->set_level(map[static_cast<int>(level)]);
}

Level parse_level(const std::string& name) {
  if (name == "debug") return Level::Debug;
  if (name == "info") return Level::Info;
  if (name == "warn") return Level::Warn;
  if (name == "error") return Level::Error;
  if (name == "off") return Level::Off;
  fail(ErrorKind::Config, "log level '" + name + "': expected one of debug, info, warn, error, off");
}

namespace {
int g_rank = 0;
}  // namespace

void set_rank(int rank) {
  g_rank = rank;
  if (rank != 0 && logger()->level() < spdlog::level::warn) logger()->set_level(spdlog::level::warn);
}

void debug(const std::string& message) { logger()->debug(message); }
void info(const std::string& message) { logger()->info(message); }
void warn(const std::string& message) { logger()->warn(message); }
void warn_rank0(const std::string& message) {
  if (g_rank == 0) logger()->warn(message);
}
void error(const std::string& message) { logger()->error(message); }

}  // namespace qt::log
