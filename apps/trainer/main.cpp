#include <iostream>
int main() { std::cout << "qlora-train " << QT_VERSION << "\n"; }
