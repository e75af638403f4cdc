#pragma once
// Catch2 is 2.13 on the Debian build machines and 3.x on the GPU image: include whichever is there.
#if __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_all.hpp>
#define QT_CATCH3 1
#else
#include <catch2/catch.hpp>
#endif
