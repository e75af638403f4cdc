#pragma once
// Logging front end. torch's headers carry fmt 12 and Debian's spdlog expects fmt 9: a file including both
// does not compile. So only log.cpp includes spdlog (and no torch header); callers format their own strings.
#include <string>

namespace qt::log {

enum class Level { Debug, Info, Warn, Error, Off };

void set_level(Level level);
Level parse_level(const std::string& name);  // "debug", "info", "warn", "error", "off"; throws qt::Error
void set_rank(int rank);                     // ranks other than 0 log warnings and errors only
void debug(const std::string& message);
void info(const std::string& message);
void warn(const std::string& message);
// A warning every rank would give alike (about the data each rank reads whole): rank 0 gives it.
void warn_rank0(const std::string& message);
void error(const std::string& message);

}  // namespace qt::log
