// The PDL switch (launchers.h: pdl_enabled). The environment is read exactly once, by the
// library's static initialization when the extension loads; launches never touch it.
#include <cctype>
#include <cstdlib>
#include <cstring>

#include "launchers.h"

namespace ck {
namespace {

bool read_pdl_env() {
  const char* v = std::getenv("CUSTOM_KERNELS_PDL");
  if (v == nullptr) return true;
  char low[8] = {0};
  size_t n = std::strlen(v);
  if (n >= sizeof(low)) return true;  // no "off" word is that long
  for (size_t i = 0; i < n; ++i) low[i] = static_cast<char>(std::tolower(static_cast<unsigned char>(v[i])));
  return !(std::strcmp(low, "0") == 0 || std::strcmp(low, "false") == 0 ||
           std::strcmp(low, "off") == 0 || std::strcmp(low, "no") == 0);
}

}  // namespace

// A function-local static: initialized exactly once, and correctly even if some other static
// initializer asked first.
bool pdl_enabled() {
  static const bool enabled = read_pdl_env();
  return enabled;
}

namespace {
// Forces the read at library load, not at the first launch (which may be inside a graph capture).
[[maybe_unused]] const bool kPdlReadAtLoad = pdl_enabled();
}  // namespace

}  // namespace ck
