fn main() {
    print!("{}", storerelay_operator::crd_yaml());
}
