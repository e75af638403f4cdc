// Translation unit that carries the shared precompiled header (cmake/qt_library.cmake).
